"""`mode eval checkpoint=DIR`: the per-layer report of a finished run, written into the run folder."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from rich.console import Console

from mode_cli import data as data_mod
from mode_cli.artifacts import load_run, load_run_config
from mode_cli.config import resolve_device, validate
from mode_cli.errors import ModeError
from mode_cli.recipes import explain_omegaconf_error
from mode_cli.report import evaluate, print_report, write_report

console = Console(stderr=True)


def apply_overrides(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """`key=value` overrides on a saved run config, type-checked against the schema."""
    for item in overrides:
        if "=" not in item:
            raise ModeError(f"Expected key=value, got '{item}'")
    try:
        return OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
    except OmegaConfBaseException as err:
        raise ModeError(explain_omegaconf_error(err)) from None


def run_eval(run_dir: Path, overrides: list[str]) -> dict:
    """Rebuild the run's model, adapter and head; evaluate every layer, base vs tuned."""
    if not run_dir.is_dir():
        raise ModeError(f"Checkpoint folder not found: {run_dir}")
    cfg = apply_overrides(load_run_config(run_dir), overrides)
    validate(cfg)
    device = resolve_device(cfg.train.device)
    model, head, tokenizer, _ = load_run(run_dir, cfg, device)
    _, eval_set = data_mod.load_splits(cfg.data, tokenizer)
    report = evaluate(cfg, model, head, eval_set, tokenizer, device)
    write_report(report, run_dir)
    print_report(report, console)
    console.print(f"report: {run_dir / 'report.json'}, {run_dir / 'report.md'}")
    return report
