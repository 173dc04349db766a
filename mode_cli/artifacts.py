"""What a run leaves behind, and loading it back.

<output_dir>/
  config.yaml               the resolved recipe
  metrics.jsonl             one record per logged step
  adapter/                  peft LoRA adapter + tokenizer
  mode_head.safetensors     the MoDE head's norms and router
  mode_head.json            what the head is (layers, router, ...)
  merged/                   base + LoRA merged: a plain transformers model with its tokenizer
  report.json, report.md    the per-layer eval report
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file

from mode_cli import model as model_mod
from mode_cli.config import RecipeConfig, trains_adapter
from mode_cli.errors import ModeError
from mode_cli.files import staged_folder
from mode_cli.head import MoDEHead

HEAD_WEIGHTS = "mode_head.safetensors"
HEAD_INFO = "mode_head.json"


def save_head(head: MoDEHead, out: Path) -> None:
    """The head's weights as safetensors, plus a small json describing it."""
    state = {k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}
    save_file(state, str(out / HEAD_WEIGHTS))
    (out / HEAD_INFO).write_text(json.dumps(head.describe(), indent=2) + "\n")
    (out / HEAD_WEIGHTS).chmod((out / HEAD_INFO).stat().st_mode & 0o777)


def load_head(run_dir: Path, model, device: str) -> MoDEHead:
    """Rebuild a saved head around `model` (its final norm is the template of the layer norms)."""
    info = json.loads((run_dir / HEAD_INFO).read_text())
    n = model_mod.num_layers(model)
    if info["num_layers"] != n:
        raise ModeError(
            f"{run_dir / HEAD_INFO} was trained on a {info['num_layers']}-layer model; "
            f"this model has {n} layers"
        )
    head = MoDEHead.from_description(model_mod.final_norm(model), info)
    head.load_state_dict(load_file(str(run_dir / HEAD_WEIGHTS)))
    return head.to(device)


def load_run_config(run_dir: Path) -> DictConfig:
    """A run's resolved recipe, merged onto the schema so overrides are type-checked."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ModeError(f"{run_dir} is not a mode run folder: it has no config.yaml")
    schema = OmegaConf.structured(RecipeConfig)
    cfg = OmegaConf.merge(schema, OmegaConf.load(path))
    OmegaConf.set_struct(cfg, True)
    return cfg


def load_run(run_dir: Path, cfg: DictConfig, device: str):
    """(model with the trained adapter, head or None, tokenizer, source) of a finished run."""
    from peft import PeftModel

    adapter = run_dir / "adapter"
    # Check before loading any weights.
    if trains_adapter(cfg) and not (adapter / "adapter_config.json").is_file():
        raise ModeError(f"{run_dir} has no trained adapter (adapter/adapter_config.json)")
    source = model_mod.resolve_source(cfg.model)
    base = model_mod.load_base_model(source, cfg.model, cfg.train.precision, device)
    if trains_adapter(cfg):
        tokenizer = model_mod.load_tokenizer(str(adapter), cfg.model)
        model = PeftModel.from_pretrained(base, str(adapter))
    else:  # mode-only: the head trained alone on the frozen base
        model, tokenizer = base, model_mod.load_tokenizer(source, cfg.model)
    head = load_head(run_dir, model, device) if (run_dir / HEAD_INFO).is_file() else None
    if head is None and cfg.loss.name != "final-only":
        raise ModeError(f"{run_dir} was trained with loss={cfg.loss.name} but has no {HEAD_INFO}")
    return model, head, tokenizer, source


def dequantized_base(cfg: DictConfig, source: str, device: str):
    """The base model as training saw it: loaded in 4 bits then dequantized, or the plain weights.

    Merging onto the 4-bit model directly drifts (rounding the merged weight back to 4 bits);
    reloading and dequantizing gives exactly the weights the adapter was trained against.
    """
    base = model_mod.load_base_model(source, cfg.model, cfg.train.precision, device)
    if getattr(base, "is_loaded_in_4bit", False):
        base = base.dequantize()
        base.config.quantization_config = None
        if hasattr(base.config, "quantization_config"):
            del base.config.quantization_config
    return base


def save_merged(cfg: DictConfig, source: str, out: Path, device: str) -> Path:
    """Base (dequantized) + LoRA merged, saved as a normal transformers model with its tokenizer."""
    from peft import PeftModel

    base = dequantized_base(cfg, source, device)
    merged = PeftModel.from_pretrained(base, str(out / "adapter")).merge_and_unload()
    merged = merged.to(model_mod.compute_dtype(cfg.train.precision))
    target = out / "merged"
    # An interrupted merge leaves no half folder behind.
    with staged_folder(target, replace=True) as staging:
        merged.save_pretrained(staging)
        tokenizer = model_mod.load_tokenizer(str(out / "adapter"), cfg.model)
        tokenizer.save_pretrained(staging)
    del merged, base
    if device == "cuda":
        torch.cuda.empty_cache()
    return target
