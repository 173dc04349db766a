"""`mode train`: the recipe (`recipe.FinetuneRecipe`: setup -> train -> save -> report -> merge),
one optimizer step's work (`steps`), the optimizer and schedule (`optim`), checkpoints and resume
(`checkpoint`), stopping cleanly (`stopping`), progress and metrics (`progress`), and sweeps over
several recipes (`sweep`)."""
