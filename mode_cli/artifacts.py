"""What a run leaves behind, and loading it back.

<output_dir>/
  config.yaml               the resolved recipe
  metrics.jsonl             one record per logged step
  adapter/                  peft LoRA adapter + tokenizer
  mode_head.safetensors     the MoDE head's norms and router
  mode_head.json            what the head is (layers, router, ...)
  merged/                   the model to deploy: base + adapter merged, the MoDE ensemble model
                            (or the final layer alone), its tokenizer and the recipe
                            (mode_config.yaml); written by `mode_cli.export`
  init_from.json            a run started with init_from=: the source and the sha256 of the
                            weights it started from (copied into merged/)
  eval/<time>/              eval reports: report.json, report.md, layers.png (eval/report.py)

`classify` tells what a `checkpoint=` names (a run folder, a merged folder or a plain model) for
`mode eval`, `mode generate`, `mode chat` and `mode_cli.load` alike.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file

from mode_cli.config import RecipeConfig, method
from mode_cli.errors import ModeError
from mode_cli.files import load_tensors, read_json, read_yaml, tensor_shapes
from mode_cli.mode.head import MoDEHead
from mode_cli.models import families
from mode_cli.models.loading import (
    ensemble_config,
    load_base_model,
    load_tokenizer,
    resolve_source,
)

RUN_CONFIG = "config.yaml"  # marks a run folder
ADAPTER_DIR = "adapter"
CHECKPOINTS_DIR = "checkpoints"  # a run folder's checkpoints, one `step-N` folder each
PEFT_CONFIG = "adapter_config.json"  # a peft adapter folder's settings
HEAD_WEIGHTS = "mode_head.safetensors"
HEAD_INFO = "mode_head.json"
MERGED_DIR = "merged"
# A merged folder's copy of the run's resolved recipe: marks it as a merged mode model.
MERGED_CONFIG = "mode_config.yaml"
# What a run started with init_from= started from (train/start_from.py writes it).
INIT_FROM_RECORD = "init_from.json"


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
    info = read_json(run_dir / HEAD_INFO)
    required = ("layers", "num_layers", "hidden_size", "router", "init_final_weight")
    missing = [key for key in required if key not in info] if isinstance(info, dict) else required
    if missing:
        raise ModeError(
            f"{run_dir / HEAD_INFO} does not describe a MoDE head: no {', '.join(missing)}"
        )
    if (problem := head_info_problem(info)) is not None:
        raise ModeError(f"{run_dir / HEAD_INFO} is damaged: {problem}")
    n = families.num_layers(model)
    if info["num_layers"] != n:
        raise ModeError(
            f"{run_dir / HEAD_INFO} was trained on a {info['num_layers']}-layer model; "
            f"this model has {n} layers"
        )
    try:
        head = MoDEHead.from_description(families.final_norm(model), info)
    except ValueError as err:  # the head refuses settings it cannot build
        raise ModeError(f"{run_dir / HEAD_INFO}: {err}") from None
    expected = {name: tuple(t.shape) for name, t in head.state_dict().items()}
    saved = tensor_shapes(run_dir / HEAD_WEIGHTS)
    if saved != expected:
        raise ModeError(
            f"{run_dir / HEAD_WEIGHTS} does not hold the head {HEAD_INFO} describes: tensors "
            f"{describe_shapes(saved)} there, {describe_shapes(expected)} expected"
        )
    head.load_state_dict(load_tensors(run_dir / HEAD_WEIGHTS))
    return head.to(device)


def head_info_problem(info: dict) -> str | None:
    """A field of `mode_head.json` of the wrong type (what `MoDEHead.describe` writes), or None."""

    def integer(value: object) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    def number(value: object) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool)

    def numbers(value: object, test) -> bool:
        return isinstance(value, list) and all(test(item) for item in value)

    expected = {
        "layers": ("a list of layer numbers", lambda v: numbers(v, integer)),
        "num_layers": ("a number of layers", integer),
        "hidden_size": ("a width", integer),
        "router": ("a router kind", lambda v: isinstance(v, str)),
        "init_final_weight": ("a weight or null", lambda v: v is None or number(v)),
        "fixed_weights": ("a list of weights or null", lambda v: v is None or numbers(v, number)),
        "router_input": ("a router input", lambda v: isinstance(v, str)),
        "detach_input": ("true or false", lambda v: isinstance(v, bool)),
        "train_final_norm": ("true or false", lambda v: isinstance(v, bool)),
    }
    for key, (what, test) in expected.items():
        if key in info and not test(info[key]):
            return f"{key} is {info[key]!r}, not {what}"
    return None


def describe_shapes(shapes: dict[str, tuple[int, ...]]) -> str:
    return ", ".join(f"{name} {list(shape)}" for name, shape in sorted(shapes.items())) or "none"


def check_saved_files(folder: Path, *, adapter: bool, head: bool) -> None:
    """Read the headers of what loading a run or merged folder reads, before any weights load: a
    damaged or truncated file is named at once, not deep inside peft or transformers."""
    if adapter:
        read_json(folder / ADAPTER_DIR / PEFT_CONFIG)
        tensor_shapes(folder / ADAPTER_DIR / "adapter_model.safetensors")
    if head:
        read_json(folder / HEAD_INFO)
        tensor_shapes(folder / HEAD_WEIGHTS)


# ---------------------------------------------------------------------------- run folders


def load_run_config(run_dir: Path, name: str = RUN_CONFIG) -> DictConfig:
    """A run's resolved recipe (`name`: `config.yaml` in a run folder, `mode_config.yaml` in a
    merged one), merged onto the schema so overrides are type-checked."""
    from omegaconf.errors import OmegaConfBaseException

    path = run_dir / name
    if not path.is_file():
        raise ModeError(f"{run_dir} is not a mode run folder: it has no {name}")
    schema = OmegaConf.structured(RecipeConfig)
    saved = read_yaml(path)
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


def run_lineage(folder: Path, cfg: DictConfig) -> dict:
    """What a run built on: the weights it started from (`init_from.json`, or the recipe's
    `init_from` alone when the record is missing) and its extensions (`train.extensions`)."""
    init_from = None
    if cfg.init_from is not None:
        init_from = {"source": cfg.init_from}
        record = folder / INIT_FROM_RECORD
        if record.is_file():
            try:
                init_from = json.loads(record.read_text())
            except (OSError, json.JSONDecodeError):
                init_from["record"] = f"{record} is unreadable"
    extensions = OmegaConf.to_container(cfg.train.extensions, resolve=True)
    return {"init_from": init_from, "extensions": extensions}


def has_adapter(folder: Path, cfg: DictConfig) -> bool:
    """Whether a run folder's model carries an adapter: one trained, or one the run kept frozen
    under its head (loss=mode-only from init_from=)."""
    return method(cfg).trains_adapter or (folder / ADAPTER_DIR / PEFT_CONFIG).is_file()


def missing_head_files(folder: Path) -> list[str]:
    return [name for name in (HEAD_INFO, HEAD_WEIGHTS) if not (folder / name).is_file()]


def check_run_files(run_dir: Path, cfg: DictConfig) -> None:
    """Refuse, before any weights load, a run folder without the files its method trains (a run
    stopped before it saved them, or a checkpoint's folder given for the run's) or with a damaged
    one."""
    trained = method(cfg)
    if trained.trains_adapter and not (run_dir / ADAPTER_DIR / PEFT_CONFIG).is_file():
        where = (
            f"; the run's folder is {run_dir.parent.parent}"
            if run_dir.parent.name == CHECKPOINTS_DIR
            else ""
        )
        raise ModeError(
            f"{run_dir} has no trained adapter (adapter/adapter_config.json): a run saves it "
            f"when it ends{where}"
        )
    missing = missing_head_files(run_dir)
    if trained.trains_head and missing:
        raise ModeError(
            f"{run_dir} was trained with loss={cfg.loss.name} but has no {' or '.join(missing)}"
        )
    check_saved_files(run_dir, adapter=has_adapter(run_dir, cfg), head=trained.trains_head)


def load_run(run_dir: Path, cfg: DictConfig, device: str):
    """(model with the trained adapter, head or None, tokenizer) of a finished run."""
    from peft import PeftModel

    adapter = run_dir / ADAPTER_DIR
    with_adapter = has_adapter(run_dir, cfg)
    check_run_files(run_dir, cfg)
    source = resolve_source(cfg.model)
    base = load_base_model(source, cfg.model, cfg.train.precision, device)
    if with_adapter:
        tokenizer = load_tokenizer(str(adapter), cfg.model)
        model = PeftModel.from_pretrained(base, str(adapter))
    else:  # mode-only: the head trained alone on the frozen base
        model, tokenizer = base, load_tokenizer(source, cfg.model)
    head = load_head(run_dir, model, device) if method(cfg).trains_head else None
    return model, head, tokenizer


def load_merged(
    path: Path, cfg: DictConfig, device: str, *, require_head: bool = True, dtype: str | None = None
):
    """(model, head or None, tokenizer) of a merged folder: the merged weights loaded as saved
    (`cfg.model.quantization`; the recipe's source and revision do not apply), with the MoDE head,
    in the recipe's compute dtype or `dtype` (`"auto"`: the dtype the folder's weights are in).

    An ensemble export holds the head in its weights: `mode` loads the base family's model from
    them and the head beside it. A final-layer export (or a merged folder of an earlier release)
    keeps the head in `mode_head.*` files; a recipe that trained a head whose files are missing is
    an error unless `require_head` is false (decoding from the final layer needs no head)."""
    for weights in sorted(path.glob("*.safetensors")):
        tensor_shapes(weights)
    model_cfg = OmegaConf.merge(cfg.model, {"name_or_path": str(path), "revision": None})
    tokenizer = load_tokenizer(str(path), model_cfg)
    extra = {"dtype": dtype} if dtype is not None else {}
    exported = ensemble_config(path)
    if exported is not None:
        return (*load_ensemble_export(path, exported, model_cfg, cfg, device, **extra), tokenizer)
    missing = missing_head_files(path)
    trains_head = method(cfg).trains_head
    if trains_head and missing and require_head:
        raise ModeError(
            f"{path} is a merged model without its MoDE head: the recipe trained one "
            f"(loss={cfg.loss.name}) but {' and '.join(missing)} is missing. Copy {HEAD_INFO} and "
            f"{HEAD_WEIGHTS} from the run folder, or use the run folder itself"
        )
    check_saved_files(path, adapter=False, head=trains_head and not missing)
    model = load_base_model(str(path), model_cfg, cfg.train.precision, device, **extra)
    head = load_head(path, model, device) if trains_head and not missing else None
    return model, head, tokenizer


def load_ensemble_export(
    path: Path, exported, model_cfg: DictConfig, cfg: DictConfig, device: str, **extra
):
    """(model, head) of an ensemble export: the base family's CausalLM from the export's weights
    (`load_base_model` reads `model.base.*` as the family's own names) and the head from
    `model.mode_head.*`; `extra` goes to `load_base_model`."""
    model = load_base_model(str(path), model_cfg, cfg.train.precision, device, **extra)
    try:
        head = MoDEHead.from_description(families.final_norm(model), exported.mode_head)
    except (KeyError, ValueError) as err:
        raise ModeError(
            f"{path / 'config.json'}: mode_head does not describe a head: {err}"
        ) from None
    saved = export_tensors(path, "model.mode_head.")
    expected = {name: tuple(t.shape) for name, t in head.state_dict().items()}
    if {name: tuple(t.shape) for name, t in saved.items()} != expected:
        raise ModeError(
            f"{path} does not hold the MoDE head its config.json describes: model.mode_head.* "
            f"holds {describe_shapes({n: tuple(t.shape) for n, t in saved.items()})}, "
            f"{describe_shapes(expected)} expected"
        )
    head.load_state_dict(saved)
    return model, head.to(device)


def export_tensors(path: Path, prefix: str) -> dict:
    """The tensors of a model folder's weights whose names start with `prefix`, without it."""
    from safetensors import safe_open

    found = {}
    for weights in sorted(path.glob("*.safetensors")):
        with safe_open(str(weights), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                if name.startswith(prefix):
                    found[name.removeprefix(prefix)] = handle.get_tensor(name)
    return found
