"""Training data, from rows to batches, one module per stage:

- `formats`: what a row of each `data.format` holds, how it is checked, its prompt;
- `sources`: reading files (.jsonl, .json, .parquet, .csv), bundled data and hub datasets in
  chunks; the sources of a recipe;
- `tokenizing`: a row to token ids with the loss on the response only (`Example`); how a reply
  ends;
- `store`: sources checked and tokenized chunk by chunk in worker processes into memory-mapped
  arrays;
- `cache`: where those arrays are kept between runs, keyed by what changes them;
- `selection`: which rows each split gets (duplicates, held-out eval rows, mixing, caps);
- `splits`: the tokenized train and eval splits of a recipe, with their counts;
- `batching`: packing, collating, the order of each epoch, the shift to next-token targets.
"""
