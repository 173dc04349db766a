"""`mode eval checkpoint=...`: the eval report of a run folder, a merged model or a plain model.

What `checkpoint=` can be, and what is evaluated:

- a run folder (`config.yaml`, written by `mode train`): the base as training loaded it (4-bit)
  with the trained adapter and MoDE head. `compare=base` (the run's `eval.compare_base`, on by
  default) adds the base before tuning: the same model with the adapter off and an untrained head.
- a merged folder (`mode_config.yaml`, the run's recipe, beside the merged weights: an ensemble
  export holds the MoDE head in its weights, a final-layer one in `mode_head.safetensors` /
  `mode_head.json`): the base family's model loaded from it in the run's precision
  (`model.quantization=none` unless overridden), with the MoDE head. A
  merged model holds no separate base, so `compare=base` (off by default) reloads the original
  base the recipe names, as training loaded it, with an untrained head.
- a plain model (a folder with `config.json`, a hub id, `package:smollm2`, `tiny:<family>`): a
  base-only logit-lens report, every layer through the final norm, no head. Its eval data come
  from `data=` (default: the bundled arithmetic eval split, 32 examples).

Shorthands besides any `key=value` of the recipe schema: `data=NAME` swaps in a data group
(`recipes/data/NAME.yaml`, or a path to such a YAML file) instead of the run's data; `eval=NAME`
swaps in eval settings (`recipes/eval/NAME.yaml`, e.g. `eval=gsm8k`); `examples=N` evaluates N
eval examples (per-layer metrics and answer accuracy); `compare=base|none`.

The report goes into a new folder `<checkpoint>/eval/<time>/` (`eval.output_dir` changes the
parent; a plain model's default is `outputs/eval/<model>/`); an earlier report is never replaced.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mode_cli.artifacts import (
    ADAPTER_DIR,
    HEAD_INFO,
    MERGED_CONFIG,
    Checkpoint,
    classify,
    has_adapter,
    load_head,
    load_merged,
    load_run,
    load_run_config,
    run_lineage,
)
from mode_cli.config import DataConfig, EvalConfig, RecipeConfig, validate
from mode_cli.console import console
from mode_cli.data.splits import load_splits
from mode_cli.devices import empty_cache, resolve_device
from mode_cli.errors import ModeError
from mode_cli.eval.answers import answer_prompts, answer_rows, base_answers, evaluate_answers
from mode_cli.eval.metrics import fresh_head, layer_metrics
from mode_cli.eval.render import print_report
from mode_cli.eval.report import EVAL_FOLDER, build_report, data_description, save_report
from mode_cli.files import check_writable_folder, read_yaml
from mode_cli.mode.head import MoDEHead
from mode_cli.models import families
from mode_cli.models.loading import (
    ensemble_config,
    load_base_model,
    load_tokenizer,
    resolve_source,
)
from mode_cli.options import TEXT, Option, choice, integer, parse_options
from mode_cli.recipes import explain_omegaconf_error, shipped_recipes_dir

# A plain model has no recipe: its eval data default to the bundled arithmetic eval split, sized
# like the demo's report.
PLAIN_MODEL_DATA = "arithmetic"
PLAIN_MODEL_EXAMPLES = 32


# `mode eval`'s own options besides recipe keys (see the module docstring).
EVAL_OPTIONS = {
    "data": TEXT,
    "eval": TEXT,
    "examples": integer(minimum=1),
    "compare": Option(choice("base", "none").parse, "base or none"),
}


def apply_overrides(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """`key=value` overrides on a saved run config, type-checked against the schema.

    Values are read by Hydra's override grammar, as `mode train` reads them (`off` stays a
    string, `[-4,-1]` is a list, `null` is None).
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    for item in overrides:
        if "=" not in item:
            raise ModeError(f"Expected key=value, got '{item}'")
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException as err:
        raise ModeError(f"Could not parse an override: {err}") from None
    updates: dict = {}
    for override in parsed:
        *parents, leaf = override.key_or_group.split(".")
        node = updates
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = override.value()
    try:
        return OmegaConf.merge(cfg, updates)
    except OmegaConfBaseException as err:
        raise ModeError(explain_omegaconf_error(err)) from None


def config_group(group: str, name: str) -> DictConfig:
    """`data=NAME` / `eval=NAME`: an option of a shipped config group (`recipes/<group>/NAME.yaml`)
    or a YAML file, on the schema's defaults for that section."""
    schema = {"data": DataConfig, "eval": EvalConfig}[group]
    path = Path(name).expanduser()
    if name.endswith(".yaml"):
        if not path.is_file():
            raise ModeError(f"{group}={name}: file not found")
    else:
        folder = shipped_recipes_dir() / group
        path = folder / f"{name}.yaml"
        if not path.is_file():
            options = ", ".join(sorted(p.stem for p in folder.glob("*.yaml")))
            raise ModeError(
                f"{group}={name}: no such {group} group option. Options: {options} (or a path to "
                "a .yaml file)"
            )
    try:
        return OmegaConf.merge(OmegaConf.structured(schema), read_yaml(path))
    except OmegaConfBaseException as err:
        raise ModeError(f"{group}={name}: {explain_omegaconf_error(err)}") from None


def with_section(cfg: DictConfig, section: str, value: DictConfig) -> DictConfig:
    """A copy of `cfg` with one whole section replaced."""
    cfg = copy.deepcopy(cfg)
    OmegaConf.set_struct(cfg, False)
    cfg[section] = value
    OmegaConf.set_struct(cfg, True)
    return cfg


def checkpoint_config(checkpoint: Checkpoint) -> tuple[DictConfig, DictConfig]:
    """The recipe a checkpoint was made with, adjusted to how `mode eval` loads it; and the
    recipe's own `model` section (for a merged model: where its base came from)."""
    if checkpoint.kind == "run":
        cfg = load_run_config(checkpoint.path)
        return cfg, cfg.model
    if checkpoint.kind == "merged":
        cfg = load_run_config(checkpoint.path, MERGED_CONFIG)
        original = copy.deepcopy(cfg.model)
        # The merged weights are a plain model: loaded as saved, not from the recipe's source.
        cfg.model.name_or_path = str(checkpoint.path)
        cfg.model.quantization = "none"
        cfg.model.revision = None
        cfg.eval.compare_base = False
        return cfg, original
    cfg = OmegaConf.merge(
        OmegaConf.structured(RecipeConfig),
        {"model": {"name_or_path": checkpoint.spec, "quantization": "none"}},
    )
    OmegaConf.set_struct(cfg, True)
    cfg = with_section(cfg, "data", config_group("data", PLAIN_MODEL_DATA))
    cfg.data.max_eval_examples = PLAIN_MODEL_EXAMPLES
    cfg.eval.compare_base = False
    return cfg, cfg.model


def eval_config(checkpoint: Checkpoint, overrides: list[str]) -> tuple[DictConfig, DictConfig]:
    """The checkpoint's recipe with the shorthands and `key=value` overrides applied, validated;
    and the recipe's own `model` section (where a merged model's base came from)."""
    cfg, original_model = checkpoint_config(checkpoint)
    options, overrides = parse_options(overrides, EVAL_OPTIONS, rest_allowed=True)
    if "data" in options:
        data = config_group("data", options["data"])
        if data.get("chat_template") is None:  # the template the model was tuned in goes on
            data.chat_template = cfg.data.chat_template
        cfg = with_section(cfg, "data", data)
    if "eval" in options:
        settings = config_group("eval", options["eval"])
        # Whether to compare with the base depends on the checkpoint, not on the settings group.
        settings.compare_base = cfg.eval.compare_base
        cfg = with_section(cfg, "eval", settings)
    shorthand = []
    if "examples" in options:
        examples = options["examples"]
        shorthand += [
            f"data.max_eval_examples={examples}",
            f"eval.max_examples={examples}",
            f"eval.answer_examples={examples}",
        ]
    if "compare" in options:
        shorthand.append(f"eval.compare_base={options['compare'] == 'base'}")
    cfg = apply_overrides(cfg, shorthand + overrides)
    if checkpoint.kind == "model" and cfg.eval.compare_base:
        raise ModeError(
            f"{checkpoint.spec} is a plain model, its own base: compare=base needs a run folder "
            "or a merged folder"
        )
    validate(cfg, training=False)
    return cfg, original_model


def report_parent(checkpoint: Checkpoint, cfg: DictConfig) -> Path:
    """The folder that receives the report's `<time>/` folder."""
    if cfg.eval.output_dir:
        return Path(cfg.eval.output_dir)
    if checkpoint.kind == "model":
        name = Path(checkpoint.spec).name if checkpoint.path else checkpoint.spec
        return Path("outputs") / EVAL_FOLDER / re.sub(r"[^A-Za-z0-9._-]+", "-", name)
    return checkpoint.path / EVAL_FOLDER


def load_plain(cfg: DictConfig, device: str):
    """(model, tokenizer) of a model folder or id, as `cfg.model` says to load it."""
    source = resolve_source(cfg.model)
    tokenizer = load_tokenizer(source, cfg.model)
    model = load_base_model(source, cfg.model, cfg.train.precision, device)
    return model, tokenizer


def merged_base_metrics(
    checkpoint: Checkpoint,
    cfg: DictConfig,
    original_model: DictConfig,
    device: str,
    rows: list[dict] | None,
) -> tuple[dict, list[str] | None]:
    """The base before tuning of a merged model: the original base the recipe names, as training
    loaded it, with an untrained head shaped like the merged folder's; its per-layer metrics, and
    its answers to `rows` (final head) when there are rows. Loaded, measured and freed before the
    merged model loads, so one model is in memory at a time."""
    base_cfg = copy.deepcopy(cfg)
    base_cfg.model = original_model
    model, _ = load_plain(base_cfg, device)
    tokenizer = load_tokenizer(str(checkpoint.path), cfg.model)
    _, eval_set = load_splits(cfg.data, tokenizer)
    head = None
    exported = ensemble_config(checkpoint.path)
    if exported is not None:
        head = MoDEHead.from_description(families.final_norm(model), exported.mode_head).to(device)
    elif (checkpoint.path / HEAD_INFO).is_file():
        head = fresh_head(load_head(checkpoint.path, model, device), model, device)
    metrics = layer_metrics(
        model, head, eval_set, tokenizer, device, cfg.eval.batch_size, cfg.eval.max_examples
    )
    texts = None
    if rows:
        prompts = answer_prompts(cfg, rows, tokenizer)
        source = resolve_source(original_model)
        texts = base_answers(base_cfg, model, tokenizer, device, prompts, source=source)
    del model
    empty_cache(device)
    return metrics, texts


def run_eval(run_dir: Path | str, overrides: list[str]) -> dict:
    """Load the checkpoint, evaluate every layer (and answers), write and print the report."""
    checkpoint = classify(str(run_dir))
    cfg, original_model = eval_config(checkpoint, overrides)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = resolve_device(cfg.train.device)
    # Where the report goes, and the answer rows, before any weights: a bad one fails fast.
    parent = report_parent(checkpoint, cfg)
    check_writable_folder(parent, "eval.output_dir", default_of=not cfg.eval.output_dir)
    rows = answer_rows(cfg)
    source = {"kind": checkpoint.kind, "checkpoint": checkpoint.spec}

    base = None
    # What the answers decode from: a 4-bit model on the CPU is rebuilt dequantized from these.
    decoding = {"source": None, "adapter": None, "base": False}
    if checkpoint.kind == "run":
        model, head, tokenizer = load_run(checkpoint.path, cfg, device)
        source["model"] = cfg.model.name_or_path
        adapter = checkpoint.path / ADAPTER_DIR
        decoding = {
            "source": resolve_source(cfg.model),
            "adapter": adapter if has_adapter(checkpoint.path, cfg) else None,
            "base": cfg.eval.compare_base,
        }
    elif checkpoint.kind == "merged":
        if cfg.eval.compare_base:
            base, decoding["base"] = merged_base_metrics(
                checkpoint, cfg, original_model, device, rows
            )
        model, head, tokenizer = load_merged(checkpoint.path, cfg, device)
        source["model"] = str(checkpoint.path)
        source["base"] = original_model.name_or_path
        decoding["source"] = str(checkpoint.path)
    else:
        try:
            model, tokenizer = load_plain(cfg, device)
        except ModeError as err:
            if checkpoint.path is None and not checkpoint.spec.startswith(("tiny:", "package:")):
                raise ModeError(
                    f"{checkpoint.spec} is neither a folder here nor a model id that loads: {err}"
                ) from None
            raise
        head = None
        source["model"] = checkpoint.spec
        decoding["source"] = resolve_source(cfg.model)

    _, eval_set = load_splits(cfg.data, tokenizer)
    console.print(
        f"[bold]mode eval[/bold] {checkpoint.spec} ({checkpoint.kind}): "
        f"{min(len(eval_set.examples), cfg.eval.max_examples or len(eval_set.examples))} eval "
        f"examples from {data_description(cfg.data)}"
        + (f"; answer accuracy on {len(rows)} rows" if rows else ""),
        soft_wrap=True,
    )
    answers = None
    if rows:
        answers = evaluate_answers(cfg, model, head, tokenizer, device, rows, **decoding)
    lineage = None if checkpoint.kind == "model" else run_lineage(checkpoint.path, cfg)
    report = build_report(
        cfg,
        model,
        head,
        eval_set,
        tokenizer,
        device,
        source=source,
        answers=answers,
        base=base,
        lineage=lineage,
    )
    folder = save_report(report, parent)
    print_report(report, console)
    console.print(f"report: {folder / 'report.json'}, report.md, layers.png", soft_wrap=True)
    return report
