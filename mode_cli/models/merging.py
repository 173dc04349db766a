"""The merged model: the base with the trained adapter folded into its weights, a plain transformers
model (`merge.base`, `merge.dtype`; `docs/method.md`, "Choices the paper leaves open").
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig
from transformers import AutoModelForCausalLM

from mode_cli.errors import ModeError
from mode_cli.models.loading import compute_dtype, first_line, load_base_model

# `merge.base`: the weights the adapter is merged into.
MERGE_BASES = ("dequantized", "original")
# `merge.dtype`: the saved weights' dtype; `auto` is the training compute dtype.
MERGE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def dequantized_base(cfg: DictConfig, source: str, device: str):
    """The base model as training saw it: loaded in 4 bits then dequantized, or the plain weights.

    Merging onto the 4-bit model directly drifts (rounding the merged weight back to 4 bits);
    reloading and dequantizing gives exactly the weights the adapter was trained against.
    """
    base = load_base_model(source, cfg.model, cfg.train.precision, device)
    if getattr(base, "is_loaded_in_4bit", False):
        base = base.dequantize()
        base.config.quantization_config = None
        if hasattr(base.config, "quantization_config"):
            del base.config.quantization_config
    return base


def original_base(cfg: DictConfig, source: str, dtype: torch.dtype, device: str):
    """The unquantized base reloaded from its source in `dtype`, without bitsandbytes.

    These are the weights a 16-bit release is built on. They are not the weights the 4-bit
    training saw: those are the NF4-rounded ones (`dequantized_base`), so the merged model
    differs from the trained adapter-on-4-bit model by that rounding.
    """
    try:
        base = AutoModelForCausalLM.from_pretrained(
            source,
            revision=cfg.model.revision,
            trust_remote_code=cfg.model.trust_remote_code,
            dtype=dtype,
        )
    except OSError as err:
        raise ModeError(
            f"Could not reload the base model '{source}' for the merge: {first_line(err)}"
        ) from None
    return base.to(device)


def merge_dtype(cfg: DictConfig) -> torch.dtype:
    """The dtype of the merged weights: `merge.dtype`, or the training compute dtype for `auto`."""
    if cfg.merge.dtype == "auto":
        return compute_dtype(cfg.train.precision)
    return MERGE_DTYPES[cfg.merge.dtype]


def merge_base(cfg: DictConfig, source: str, device: str):
    """The weights the adapter is merged into, as `merge.base` asks."""
    if cfg.merge.base == "original":
        return original_base(cfg, source, merge_dtype(cfg), device)
    return dequantized_base(cfg, source, device)


def merge_into(base, adapter_dir: Path):
    """`base` with the adapter saved in `adapter_dir` folded into its weights (edits `base`)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()


def merge_adapter(cfg: DictConfig, source: str, adapter_dir: Path, device: str):
    """The base `merge.base` names with the adapter in `adapter_dir` merged in, in `merge.dtype`."""
    return merge_into(merge_base(cfg, source, device), adapter_dir).to(merge_dtype(cfg))
