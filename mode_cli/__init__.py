"""mode: Mixture-of-Depths Ensemble (MoDE) finetuning for large language models.

`from mode_cli import load` gives a finished run's model decoding with the MoDE ensemble head
(see `mode_cli.api`); the import of torch and transformers waits until it is used.
"""

__version__ = "0.1.0"

_API = ("load", "use_head", "format_prompt", "prompt_inputs", "harness_dir")
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from mode_cli import api

        return getattr(api, name)
    raise AttributeError(f"module 'mode_cli' has no attribute {name!r}")
