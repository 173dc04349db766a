"""The base model: where each architecture keeps the parts MoDE reads (`families`), loading it in
4 bits with its tokenizer and attaching the adapter (`loading`), tiny random-init models for tests
(`tiny`), and the packaged SmolLM2 (`smollm2`)."""
