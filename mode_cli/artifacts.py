"""What a run leaves behind, and loading it back.

<output_dir>/
  config.yaml               the resolved recipe
  metrics.jsonl             one record per logged step
  adapter/                  peft LoRA adapter + tokenizer
  mode_head.safetensors     the MoDE head's norms and router
  mode_head.json            what the head is (layers, router, ...)
  merged/                   base + LoRA merged: a plain transformers model with its tokenizer,
                            plus the head files and the recipe (mode_config.yaml)
  eval/<time>/              eval reports: report.json, report.md, layers.png (eval/report.py)

`classify` tells what a `checkpoint=` names (a run folder, a merged folder or a plain model) for
`mode eval`, `mode generate`, `mode chat` and `mode_cli.load` alike.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file

from mode_cli.config import RecipeConfig, method
from mode_cli.errors import ModeError
from mode_cli.files import staged_folder
from mode_cli.mode.head import MoDEHead
from mode_cli.models import families
from mode_cli.models.loading import load_base_model, load_tokenizer, resolve_source
from mode_cli.models.merging import merge_adapter

RUN_CONFIG = "config.yaml"  # marks a run folder
ADAPTER_DIR = "adapter"
HEAD_WEIGHTS = "mode_head.safetensors"
HEAD_INFO = "mode_head.json"
MERGED_DIR = "merged"
# A merged folder's copy of the run's resolved recipe: marks it as a merged mode model.
MERGED_CONFIG = "mode_config.yaml"


# ---------------------------------------------------------------------------- what a folder is


@dataclass(frozen=True)
class Checkpoint:
    """What `checkpoint=` names: kind `run`, `merged` or `model` (a plain model); `path` is None
    for a model id (`tiny:llama`, `package:smollm2`, a hub id)."""

    kind: str
    spec: str
    path: Path | None


def classify(spec: str | Path, *, plain_models: bool = True) -> Checkpoint:
    """Tell a run folder, a merged folder and a plain model apart; anything else is an error.

    `plain_models=False` (decoding, `mode_cli.load`) accepts only what `mode` wrote: a run folder or
    its merged folder.
    """
    spec = str(spec)
    if plain_models and spec.startswith(("tiny:", "package:")):
        return Checkpoint("model", spec, None)
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / RUN_CONFIG).is_file():
            return Checkpoint("run", spec, path)
        if (path / MERGED_CONFIG).is_file():
            return Checkpoint("merged", spec, path)
        if (path / "config.json").is_file():
            if plain_models:
                return Checkpoint("model", spec, path)
            raise ModeError(
                f"{path} is a transformers model folder but not one written by mode (no "
                f"{MERGED_CONFIG}): load it with AutoModelForCausalLM.from_pretrained, or pass the "
                "run folder"
            )
        accepted = "a mode run folder, merged folder or model folder"
        if not plain_models:
            accepted = "a mode run folder or merged folder"
        raise ModeError(
            f"{path} is not {accepted}: it has no {RUN_CONFIG} (a run), {MERGED_CONFIG} (a merged "
            "model)" + (" or config.json (a model)" if plain_models else "")
        )
    if path.exists():
        raise ModeError(
            f"{spec} is a file; checkpoint= takes a folder"
            + (" or a model id" if plain_models else "")
        )
    if not plain_models or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise ModeError(f"Checkpoint folder not found: {spec}")
    return Checkpoint("model", spec, None)  # a hub id, `org/name`


# ---------------------------------------------------------------------------- the MoDE head


def save_head(head: MoDEHead, out: Path, state: dict | None = None) -> None:
    """The head's weights as safetensors, plus a small json describing it. `state` is the head's
    state dict when it was gathered elsewhere (a sharded head's parameters are shards)."""
    if state is None:
        state = {k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}
    save_file(state, str(out / HEAD_WEIGHTS))
    (out / HEAD_INFO).write_text(json.dumps(head.describe(), indent=2) + "\n")
    (out / HEAD_WEIGHTS).chmod((out / HEAD_INFO).stat().st_mode & 0o777)


def load_head(run_dir: Path, model, device: str) -> MoDEHead:
    """Rebuild a saved head around `model` (its final norm is the template of the layer norms)."""
    info = json.loads((run_dir / HEAD_INFO).read_text())
    n = families.num_layers(model)
    if info["num_layers"] != n:
        raise ModeError(
            f"{run_dir / HEAD_INFO} was trained on a {info['num_layers']}-layer model; "
            f"this model has {n} layers"
        )
    head = MoDEHead.from_description(families.final_norm(model), info)
    head.load_state_dict(load_file(str(run_dir / HEAD_WEIGHTS)))
    return head.to(device)


# ---------------------------------------------------------------------------- run folders


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
    if "lora" in saved and "adapter" not in saved:
        # Runs saved before the `adapter` key took the name of its recipe group wrote `lora`.
        saved.adapter = saved.pop("lora")
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

    adapter = run_dir / ADAPTER_DIR
    trained = method(cfg)
    # Check before loading any weights.
    if trained.trains_adapter and not (adapter / "adapter_config.json").is_file():
        raise ModeError(f"{run_dir} has no trained adapter (adapter/adapter_config.json)")
    missing = missing_head_files(run_dir)
    if trained.trains_head and missing:
        raise ModeError(
            f"{run_dir} was trained with loss={cfg.loss.name} but has no {' or '.join(missing)}"
        )
    source = resolve_source(cfg.model)
    base = load_base_model(source, cfg.model, cfg.train.precision, device)
    if trained.trains_adapter:
        tokenizer = load_tokenizer(str(adapter), cfg.model)
        model = PeftModel.from_pretrained(base, str(adapter))
    else:  # mode-only: the head trained alone on the frozen base
        model, tokenizer = base, load_tokenizer(source, cfg.model)
    head = load_head(run_dir, model, device) if trained.trains_head else None
    return model, head, tokenizer


def load_merged(path: Path, cfg: DictConfig, device: str, *, require_head: bool = True):
    """(model, head or None, tokenizer) of a merged folder: the merged weights loaded as saved
    (`cfg.model.quantization`; the recipe's source and revision do not apply), with the MoDE head
    kept beside them. A recipe that trained a head whose files are missing is an error unless
    `require_head` is false (decoding from the final layer needs no head)."""
    missing = missing_head_files(path)
    trains_head = method(cfg).trains_head
    if trains_head and missing and require_head:
        raise ModeError(
            f"{path} is a merged model without its MoDE head: the recipe trained one "
            f"(loss={cfg.loss.name}) but {' and '.join(missing)} is missing. Copy {HEAD_INFO} and "
            f"{HEAD_WEIGHTS} from the run folder, or use the run folder itself"
        )
    model_cfg = OmegaConf.merge(cfg.model, {"name_or_path": str(path), "revision": None})
    model = load_base_model(str(path), model_cfg, cfg.train.precision, device)
    tokenizer = load_tokenizer(str(path), model_cfg)
    head = load_head(path, model, device) if trains_head and not missing else None
    return model, head, tokenizer


def save_merged(cfg: DictConfig, source: str, out: Path, device: str) -> Path:
    """Base + LoRA merged into `<out>/merged`: a plain transformers model with its tokenizer.

    The folder also carries what `mode` needs to use it with the MoDE ensemble later: the head
    (`mode_head.safetensors`, `mode_head.json`) when the run has one, and the run's resolved
    recipe as `mode_config.yaml`. `from_pretrained` ignores these files.
    """
    merged = merge_adapter(cfg, source, out / ADAPTER_DIR, device)
    target = out / MERGED_DIR
    # An interrupted merge leaves no half folder behind.
    with staged_folder(target, replace=True) as staging:
        merged.save_pretrained(staging)
        tokenizer = load_tokenizer(str(out / ADAPTER_DIR), cfg.model)
        tokenizer.save_pretrained(staging)
        for name in (HEAD_WEIGHTS, HEAD_INFO):
            if (out / name).is_file():
                shutil.copyfile(out / name, staging / name)
        (staging / MERGED_CONFIG).write_text(OmegaConf.to_yaml(cfg, resolve=True))
    del merged
    if device == "cuda":
        torch.cuda.empty_cache()
    return target
