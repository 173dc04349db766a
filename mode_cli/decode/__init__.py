"""Decoding from a finished run: the MoDE head on a transformers model (`ensemble`), generating
text with either head (`generate`), and the terminal conversation of `mode chat` (`chat`)."""
