"""What a run leaves behind, and loading it back.

<output_dir>/
  config.yaml               the resolved recipe
  metrics.jsonl             one record per logged step
  adapter/                  peft LoRA adapter + tokenizer
  mode_head.safetensors     the MoDE head's norms and router
  mode_head.json            what the head is (layers, router, ...)
  merged/                   base + LoRA merged: a plain transformers model with its tokenizer,
                            plus the head files and the recipe (mode_config.yaml)
  eval/<time>/              eval reports: report.json, report.md, layers.png (report.py)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from mode_cli import model as model_mod
from mode_cli.config import RecipeConfig, trains_adapter, trains_head
from mode_cli.errors import ModeError
from mode_cli.files import staged_folder
from mode_cli.head import MoDEHead

RUN_CONFIG = "config.yaml"  # marks a run folder
HEAD_WEIGHTS = "mode_head.safetensors"
HEAD_INFO = "mode_head.json"
# A merged folder's copy of the run's resolved recipe: marks it as a merged mode model.
MERGED_CONFIG = "mode_config.yaml"
MERGE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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


def load_run_config(run_dir: Path, name: str = RUN_CONFIG) -> DictConfig:
    """A run's resolved recipe (`name`: `config.yaml` in a run folder, `mode_config.yaml` in a
    merged one), merged onto the schema so overrides are type-checked."""
    from omegaconf.errors import OmegaConfBaseException
    from yaml import YAMLError

    path = run_dir / name
    if not path.is_file():
        raise ModeError(f"{run_dir} is not a mode run folder: it has no {name}")
    schema = OmegaConf.structured(RecipeConfig)
    try:
        saved = OmegaConf.load(path)
    except (YAMLError, OmegaConfBaseException) as err:
        raise ModeError(f"{path} is not a mode recipe: {str(err).splitlines()[0]}") from None
    if not isinstance(saved, DictConfig):
        raise ModeError(f"{path} is not a mode recipe: it holds a list, not a mapping of keys")
    if isinstance(saved.get("merge"), bool):
        # Runs saved before `merge` became a group of keys wrote `merge: true|false`.
        saved.merge = {"enabled": saved.merge}
    if "template" in saved.get("data", {}):
        # Runs saved before `data.format` named the prompt format wrote `data.template`.
        saved.data.format = saved.data.pop("template")
    try:
        cfg = OmegaConf.merge(schema, saved)
    except OmegaConfBaseException as err:
        raise ModeError(f"{path} is not a mode recipe: {str(err).splitlines()[0]}") from None
    OmegaConf.set_struct(cfg, True)
    return cfg


def missing_head_files(folder: Path) -> list[str]:
    return [name for name in (HEAD_INFO, HEAD_WEIGHTS) if not (folder / name).is_file()]


def load_run(run_dir: Path, cfg: DictConfig, device: str):
    """(model with the trained adapter, head or None, tokenizer) of a finished run."""
    from peft import PeftModel

    adapter = run_dir / "adapter"
    # Check before loading any weights.
    if trains_adapter(cfg) and not (adapter / "adapter_config.json").is_file():
        raise ModeError(f"{run_dir} has no trained adapter (adapter/adapter_config.json)")
    missing = missing_head_files(run_dir)
    if trains_head(cfg) and missing:
        raise ModeError(
            f"{run_dir} was trained with loss={cfg.loss.name} but has no {' or '.join(missing)}"
        )
    source = model_mod.resolve_source(cfg.model)
    base = model_mod.load_base_model(source, cfg.model, cfg.train.precision, device)
    if trains_adapter(cfg):
        tokenizer = model_mod.load_tokenizer(str(adapter), cfg.model)
        model = PeftModel.from_pretrained(base, str(adapter))
    else:  # mode-only: the head trained alone on the frozen base
        model, tokenizer = base, model_mod.load_tokenizer(source, cfg.model)
    head = load_head(run_dir, model, device) if trains_head(cfg) else None
    return model, head, tokenizer


def load_merged(path: Path, cfg: DictConfig, device: str, *, require_head: bool = True):
    """(model, head or None, tokenizer) of a merged folder: the merged weights loaded as saved
    (`cfg.model.quantization`; the recipe's source and revision do not apply), with the MoDE head
    kept beside them. A recipe that trained a head whose files are missing is an error unless
    `require_head` is false (decoding from the final layer needs no head)."""
    missing = missing_head_files(path)
    if trains_head(cfg) and missing and require_head:
        raise ModeError(
            f"{path} is a merged model without its MoDE head: the recipe trained one "
            f"(loss={cfg.loss.name}) but {' and '.join(missing)} is missing. Copy {HEAD_INFO} and "
            f"{HEAD_WEIGHTS} from the run folder, or use the run folder itself"
        )
    model_cfg = OmegaConf.merge(cfg.model, {"name_or_path": str(path), "revision": None})
    model = model_mod.load_base_model(str(path), model_cfg, cfg.train.precision, device)
    tokenizer = model_mod.load_tokenizer(str(path), model_cfg)
    head = load_head(path, model, device) if trains_head(cfg) and not missing else None
    return model, head, tokenizer


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
            f"Could not reload the base model '{source}' for the merge: {model_mod.first_line(err)}"
        ) from None
    return base.to(device)


def merge_dtype(cfg: DictConfig) -> torch.dtype:
    """The dtype of the merged weights: `merge.dtype`, or the training compute dtype for `auto`."""
    if cfg.merge.dtype == "auto":
        return model_mod.compute_dtype(cfg.train.precision)
    return MERGE_DTYPES[cfg.merge.dtype]


def merge_base(cfg: DictConfig, source: str, device: str):
    """The weights the adapter is merged into, as `merge.base` asks."""
    if cfg.merge.base == "original":
        return original_base(cfg, source, merge_dtype(cfg), device)
    return dequantized_base(cfg, source, device)


def save_merged(cfg: DictConfig, source: str, out: Path, device: str) -> Path:
    """Base + LoRA merged into `<out>/merged`: a plain transformers model with its tokenizer.

    The folder also carries what `mode` needs to use it with the MoDE ensemble later: the head
    (`mode_head.safetensors`, `mode_head.json`) when the run has one, and the run's resolved
    recipe as `mode_config.yaml`. `from_pretrained` ignores these files.
    """
    from peft import PeftModel

    base = merge_base(cfg, source, device)
    merged = PeftModel.from_pretrained(base, str(out / "adapter")).merge_and_unload()
    merged = merged.to(merge_dtype(cfg))
    target = out / "merged"
    # An interrupted merge leaves no half folder behind.
    with staged_folder(target, replace=True) as staging:
        merged.save_pretrained(staging)
        tokenizer = model_mod.load_tokenizer(str(out / "adapter"), cfg.model)
        tokenizer.save_pretrained(staging)
        for name in (HEAD_WEIGHTS, HEAD_INFO):
            if (out / name).is_file():
                shutil.copyfile(out / name, staging / name)
        (staging / MERGED_CONFIG).write_text(OmegaConf.to_yaml(cfg, resolve=True))
    del merged, base
    if device == "cuda":
        torch.cuda.empty_cache()
    return target
