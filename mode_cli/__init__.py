"""mode: Mixture-of-Depths Ensemble (MoDE) finetuning for large language models."""

__version__ = "0.1.0"
