"""`mode export checkpoint=RUN out=DIR [head=ensemble|final] [dtype=bf16|fp16|fp32]
[base=dequantized|original]`: a finished run as a model folder to deploy (`folder.py`).

The end of `mode train` writes the same export into the run's `merged/` (`export_run`), as its
`merge.*` keys say. From Python, a script exports a run the same way:

    from mode_cli.export.command import export
    export("outputs/smollm2-arithmetic/<time>", "exports/final", head="final")
"""

from __future__ import annotations

import copy
import gc
from pathlib import Path

from omegaconf import DictConfig

from mode_cli.artifacts import (
    ADAPTER_DIR,
    INIT_FROM_RECORD,
    MERGED_CONFIG,
    RUN_CONFIG,
    check_run_files,
    classify,
    has_adapter,
    load_head,
    load_merged,
    load_run_config,
)
from mode_cli.config import method
from mode_cli.console import console
from mode_cli.decode.ensemble import check_recipe_head_kind
from mode_cli.devices import empty_cache, resolve_device
from mode_cli.errors import ModeError
from mode_cli.eval.report import training_report
from mode_cli.export.card import model_card
from mode_cli.export.folder import write_export
from mode_cli.files import check_writable_folder
from mode_cli.mode.methods import HEAD_KINDS
from mode_cli.models.loading import load_tokenizer, resolve_source
from mode_cli.models.merging import (
    MERGE_BASES,
    MERGE_DTYPES,
    merge_adapter,
    merge_base,
    merge_dtype,
)
from mode_cli.options import TEXT, choice, parse_options, raise_problems

EXPORT_OPTIONS = {
    "checkpoint": TEXT,
    "out": TEXT,
    "head": choice(*HEAD_KINDS),
    "dtype": choice(*MERGE_DTYPES),
    "base": choice(*MERGE_BASES),
}


def export_head(cfg: DictConfig) -> str:
    """What an export of this run decodes with: `merge.head`, or for `auto` the method's own (the
    ensemble when the run trained a router)."""
    return method(cfg).default_head if cfg.merge.head == "auto" else cfg.merge.head


def settled(cfg: DictConfig, head_kind: str) -> DictConfig:
    """The recipe as the export records it: `merge.head` and `merge.dtype` say what the folder
    holds, not `auto`."""
    cfg = copy.deepcopy(cfg)
    cfg.merge.head = head_kind
    if cfg.merge.dtype == "auto":
        cfg.merge.dtype = next(k for k, v in MERGE_DTYPES.items() if v == merge_dtype(cfg))
    return cfg


def export_run(run_dir: Path, target: Path, cfg: DictConfig, device: str) -> Path:
    """The export of a run folder into `target`, as `cfg.merge` says: the adapter merged into the
    `merge.base` base in `merge.dtype`, decoding with `merge.head` (`export_head`)."""
    head_kind = export_head(cfg)
    trained = method(cfg)
    check_run_files(run_dir, cfg)
    source = resolve_source(cfg.model)
    # A trained adapter, or the one a mode-only run from init_from= kept frozen under its head.
    if has_adapter(run_dir, cfg):
        model = merge_adapter(cfg, source, run_dir / ADAPTER_DIR, device)
        tokenizer = load_tokenizer(str(run_dir / ADAPTER_DIR), cfg.model)
    else:  # mode-only: the head trained on the frozen base
        model = merge_base(cfg, source, device).to(merge_dtype(cfg))
        tokenizer = load_tokenizer(source, cfg.model)
    head = load_head(run_dir, model, device) if trained.trains_head else None
    try:
        return write(
            target,
            cfg,
            model,
            head,
            tokenizer,
            head_kind,
            training_report(run_dir, cfg.eval.output_dir),
            run_dir,
        )
    finally:
        del model, head
        gc.collect()
        empty_cache(device)


def export_merged(folder: Path, target: Path, cfg: DictConfig) -> Path:
    """The export of a merged folder (an earlier export) into `target`, in `merge.dtype`, decoding
    with `merge.head`: the same weights, another head or dtype."""
    head_kind = export_head(cfg)
    loaded = copy.deepcopy(cfg)
    loaded.model.quantization = "none"
    # Loaded in the dtype it was saved in: another export of the folder starts from its weights.
    model, head, tokenizer = load_merged(
        folder, loaded, "cpu", require_head=head_kind == "ensemble", dtype="auto"
    )
    model = model.to(merge_dtype(cfg))
    report = training_report(folder)
    return write(target, cfg, model, head, tokenizer, head_kind, report, folder)


def write(
    target, cfg, model, head, tokenizer, head_kind, report, source: Path | None = None
) -> Path:
    """The export, with the record of what the run started from (`init_from.json`) when `source`
    (the run or merged folder exported) has one: `mode eval` reports it as the run's lineage."""
    cfg = settled(cfg, head_kind)
    description = head.describe() if head is not None else None
    card = model_card(cfg, head_kind=head_kind, head=description, report=report)
    records = [] if source is None else [p for p in (source / INIT_FROM_RECORD,) if p.is_file()]
    return write_export(
        target,
        cfg=cfg,
        model=model,
        head=head,
        tokenizer=tokenizer,
        head_kind=head_kind,
        card=card,
        records=records,
    )


def check_target(out: Path, checkpoint: Path) -> None:
    """`out=` must be a new or empty folder outside the checkpoint: an export never replaces
    anything a user has."""
    out_abs, checkpoint_abs = out.resolve(), checkpoint.resolve()
    if out_abs == checkpoint_abs or checkpoint_abs in out_abs.parents:
        raise ModeError(f"out={out}: inside the checkpoint {checkpoint}; pick a folder outside it")
    if out.is_dir() and any(out.iterdir()):
        raise ModeError(f"out={out}: the folder exists and is not empty (nothing was changed)")
    check_writable_folder(out, "out")


def export(
    checkpoint: str | Path,
    out: str | Path,
    *,
    head: str | None = None,
    dtype: str | None = None,
    base: str | None = None,
) -> Path:
    """Export a run folder (or a merged folder) into `out`, a new or empty folder.

    Args:
        checkpoint: a run folder written by `mode train` (any release), or its `merged/`.
        out: where the export goes.
        head: `ensemble` (the MoDE model, loads with `trust_remote_code=True`) or `final` (a
            plain model of the base family); None: the run's own (`merge.head`, `auto`: the
            ensemble when the run has one).
        dtype: `bf16`, `fp16` or `fp32`; None: the run's `merge.dtype`.
        base: `dequantized` (the 4-bit base as training saw it) or `original` (the 16-bit base
            reloaded from its source); None: the run's `merge.base`. Run folders only.
    """
    found = classify(str(checkpoint), plain_models=False)
    path = found.path
    cfg = load_run_config(path, RUN_CONFIG if found.kind == "run" else MERGED_CONFIG)
    problems: list[str] = []
    given = {"head": head, "dtype": dtype, "base": base}
    words = [f"{key}={value}" for key, value in given.items() if value is not None]
    parse_options(words, {key: EXPORT_OPTIONS[key] for key in given}, problems=problems)
    if base is not None and found.kind != "run":
        problems.append(
            f"base={base}: applies to a run folder (where the adapter is merged); {path} is "
            "merged already"
        )
    if head is not None:
        cfg.merge.head = head
    if dtype is not None:
        cfg.merge.dtype = dtype
    if base is not None and found.kind == "run":
        cfg.merge.base = base
    raise_problems(problems)
    head_kind = export_head(cfg)
    check_recipe_head_kind(head_kind, cfg.loss.name, where=str(path))
    out = Path(out).expanduser()
    check_target(out, path)
    if found.kind == "run":
        return export_run(path, out, cfg, resolve_device("auto"))
    return export_merged(path, out, cfg)


def run_export(words: list[str]) -> Path:
    """`mode export key=value ...`: read the options, export, say what was written."""
    problems: list[str] = []
    values, _ = parse_options(words, EXPORT_OPTIONS, problems=problems)
    for key, meaning in (("checkpoint", "a run folder written by mode train"), ("out", "a folder")):
        if key not in values:
            problems.append(f"{key}= is required: {meaning}")
    raise_problems(problems)
    console.print(f"[dim]exporting {values['checkpoint']} ...[/dim]")
    target = export(
        values["checkpoint"],
        values["out"],
        head=values.get("head"),
        dtype=values.get("dtype"),
        base=values.get("base"),
    )
    cfg = load_run_config(target, MERGED_CONFIG)
    how = (
        "the MoDE ensemble: load it with trust_remote_code=True"
        if cfg.merge.head == "ensemble"
        else "the final layer: a plain transformers model"
    )
    console.print(f"exported to {target} ({cfg.merge.dtype}), decoding with {how}", soft_wrap=True)
    return target
