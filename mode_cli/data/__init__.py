"""Training data, from rows to batches, one module per stage:

- `formats`: what a row of each `data.format` holds, how it is checked, its prompt;
- `sources`: reading files, bundled data and hub datasets; held-out and mixed rows;
- `tokenizing`: a row to token ids with the loss on the response only (`Example`);
- `splits`: the tokenized train and eval splits of a recipe, with their counts;
- `batching`: packing, collating, the order of each epoch, the shift to next-token targets.
"""
