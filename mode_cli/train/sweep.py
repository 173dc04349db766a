"""`mode train -m`: a sweep over override values, run one after another, then a comparison table.

    mode train -m recipe=tiny-llama-alpaca loss=mode,final-only train.lr=1e-4,2e-4

Sweep values use Hydra's override grammar: `key=a,b`, `key=range(1,4)`, `key=choice(a,b)`, and
`group=glob(last*)` for config groups (`recipe=` can be swept too). The runs are the product of
the swept values, the first swept key varying slowest (as in Hydra's basic sweeper). Every
combination is composed and validated before the first one starts, so a typo in the last value
fails at once. The runs go one after another in this process, each in its own folder
`<sweep_dir>/<index>-<swept values>/`, where sweep_dir is `output_dir` when given, else
`outputs/<recipe>/<time>-sweep/`.

The same command with `resume=auto` continues a stopped sweep in its folder: a run that finished
(its end-of-training report is of train.max_steps) is kept, with its wall time, and the others
resume from their checkpoints or start; a resumed run's wall time adds up its sittings.

A run that stops on a user error (ModeError) is recorded as failed and the sweep goes on; the
command exits non-zero at the end if any run failed. Ctrl-C stops the sweep. After each run the
sweep folder's `sweep.json` and `sweep.md` are rewritten, so a stopped sweep keeps the results
it has: per run the overrides, the final train loss, the eval loss of each head (final layer,
ensemble, each other selected layer), the exact-match answer accuracy of the final head and the
ensemble (when the report has it), the wall time and the status.

With `train.seed` swept (`train.seed=0,1,2`), runs that differ only in seed form a group: the
summary adds each group's mean ± standard deviation per metric and, for groups that differ in one
setting, the difference paired by seed with its 95% t-interval (`seeds.py`). `sweep.png` shows
each metric per group, one dot per seed.
"""

from __future__ import annotations

import gc
import itertools
import json
import math
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, ValueType
from hydra.errors import HydraException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from mode_cli.artifacts import MERGED_DIR, has_adapter
from mode_cli.config import validate
from mode_cli.errors import ModeError
from mode_cli.eval.report import latest_report
from mode_cli.models.loading import resolve_source
from mode_cli.recipes import compose_recipe, recipe_files, shipped_recipes_dir
from mode_cli.train import start_from
from mode_cli.train.progress import METRICS_FILE
from mode_cli.train.recipe import FinetuneRecipe
from mode_cli.train.seeds import (
    SEED_KEY,
    Metric,
    comparisons,
    group_runs,
    metrics_of,
    seed_of,
    summary_json,
)

SCHEMA = {"name": "mode-sweep", "version": 2}
SUMMARY_JSON = "sweep.json"
SUMMARY_MD = "sweep.md"
SUMMARY_PNG = "sweep.png"
# Run folder names stay within characters that need no quoting in a shell or a Hydra override.
_UNSAFE = re.compile(r"[^A-Za-z0-9.+-]+")
MAX_NAME = 80


@dataclass
class SweepRun:
    """One combination of the sweep: its overrides, its folder, and what it produced."""

    index: int
    recipe: str
    overrides: list[str]
    swept: dict[str, str]
    out: Path
    cfg: DictConfig | None = None
    status: str = "pending"
    error: str | None = None
    wall_s: float | None = None
    train_loss: float | None = None
    eval_loss: dict = field(default_factory=dict)
    # Exact-match accuracy by head: `final`, `ensemble` (tuned) and `base`, when the report has it.
    answers: dict = field(default_factory=dict)
    report: Path | None = None  # the report.json this sweep's run wrote

    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.swept.items()) or "(no swept keys)"

    def to_json(self) -> dict:
        return {
            "index": self.index,
            "dir": str(self.out),
            "recipe": self.recipe,
            "overrides": self.overrides,
            "swept": self.swept,
            "status": self.status,
            "error": self.error,
            "wall_s": self.wall_s,
            "final_train_loss": self.train_loss,
            "eval_loss": self.eval_loss,
            "exact_match": self.answers,
        }


@dataclass
class Sweep:
    """The whole sweep: where it writes, what was asked for, and its runs in order."""

    directory: Path
    overrides: list[str]
    swept_keys: list[str]
    runs: list[SweepRun]
    recipes_dir: Path | None = None


# ---------------------------------------------------------------------------- expanding


def parse_overrides(overrides: list[str]) -> list[Override]:
    """The overrides parsed by Hydra's own grammar (what `compose` would parse)."""
    try:
        return OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException as err:
        message = str(err).split("\nSee https://")[0].strip()
        raise ModeError(f"Could not parse an override: {message}") from None


def override_values(override: Override, recipes_dir: Path | None = None) -> list[tuple[str, str]]:
    """Every `(key, value)` one override stands for: one pair, or one per swept value.

    Values are in override syntax (quoted or escaped as needed), ready to be joined by `=`;
    `recipe` and `output_dir`, which `mode` reads itself, get their plain value.
    """
    key = override.get_key_element()
    plain = override.key_or_group in ("recipe", "output_dir")
    if not override.is_sweep_override():
        value = override.value() if plain else override.get_value_element_as_str()
        return [(key, str(value))]
    if override.key_or_group == "output_dir":
        raise ModeError("output_dir cannot be swept: it is the sweep's folder (one value)")
    if override.value_type == ValueType.INTERVAL_SWEEP:
        raise ModeError(
            f"{override.input_line}: interval() has no fixed values to run; list them "
            f"instead ({key}=a,b,c or {key}=range(start,stop,step))"
        )
    if override.value_type == ValueType.GLOB_CHOICE_SWEEP:
        options = group_options(override.key_or_group, recipes_dir)
        values = override.value().filter(options)
        if not values:
            raise ModeError(
                f"{override.input_line} matches no option of group '{override.key_or_group}' "
                f"(options: {', '.join(options) or 'none'})"
            )
        return [(key, value) for value in values]
    try:
        if plain:
            return [(key, str(value)) for value in override.sweep_iterator()]
        return [(key, value) for value in override.sweep_string_iterator()]
    except HydraException as err:
        raise ModeError(f"{override.input_line}: {err}") from None


def group_options(group: str, recipes_dir: Path | None = None) -> list[str]:
    """Options of a config group (or the recipes, for `recipe`) that a glob sweep can match."""
    folders = [shipped_recipes_dir()] + ([recipes_dir] if recipes_dir is not None else [])
    if group == "recipe":
        return sorted({name for folder in folders for name in recipe_files(folder)})
    return sorted({p.stem for folder in folders for p in (folder / group).glob("*.yaml")})


def expand(
    overrides: list[str], recipes_dir: Path | None = None
) -> tuple[list[list[tuple[str, str]]], list[str]]:
    """(every combination as a list of (key, value) pairs, the swept keys), in Hydra's order."""
    choices: list[list[tuple[str, str]]] = []
    swept: list[str] = []
    for override in parse_overrides(overrides):
        values = override_values(override, recipes_dir)
        if override.is_sweep_override():
            key = override.get_key_element()
            if key in swept:
                raise ModeError(f"{key} is swept twice: give all its values in one override")
            swept.append(key)
        choices.append(values)
    return [list(combo) for combo in itertools.product(*choices)], swept


def run_name(index: int, swept: dict[str, str], width: int) -> str:
    """`03-loss-final-only_train.lr-0.0002`: the index, then the swept values, shell-safe."""
    parts = []
    for key, value in swept.items():
        key = _UNSAFE.sub("-", key.lstrip("+~").replace("/", ".")).strip("-")
        parts.append(f"{key}-{_UNSAFE.sub('-', value).strip('-')}")
    name = "_".join(parts)[:MAX_NAME].rstrip("-_")
    prefix = f"{index:0{width}d}"
    return f"{prefix}-{name}" if name else prefix


def default_sweep_dir(recipes: set[str], now: datetime | None = None) -> Path:
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    name = Path(next(iter(recipes))).stem if len(recipes) == 1 else "sweep"
    return Path("outputs") / name / f"{stamp}-sweep"


def plan_sweep(
    overrides: list[str], recipes_dir: Path | None = None, *, check_hardware: bool = True
) -> Sweep:
    """Expand the sweep, then compose and validate every combination; one error lists them all."""
    combos, swept_keys = expand(overrides, recipes_dir)
    output_dirs = {v for combo in combos for k, v in combo if k == "output_dir"}
    recipes = {v for combo in combos for k, v in combo if k == "recipe"}
    if not recipes or any(not any(k == "recipe" for k, _ in c) for c in combos):
        raise ModeError("mode train needs recipe=NAME (`mode recipes` lists them)")
    directory = Path(output_dirs.pop()) if output_dirs else default_sweep_dir(recipes)
    width = len(str(len(combos) - 1))
    runs: list[SweepRun] = []
    # One line per distinct problem: a bad value shared by several combinations is named once.
    problems: dict[str, list[SweepRun]] = {}
    for index, combo in enumerate(combos):
        swept = {k: v for k, v in combo if k in swept_keys}
        recipe = next(v for k, v in combo if k == "recipe")
        rest = [f"{k}={v}" for k, v in combo if k not in ("recipe", "output_dir")]
        run = SweepRun(index, recipe, rest, swept, directory / run_name(index, swept, width))
        try:
            cfg = compose_recipe(recipe, rest, recipes_dir)
            cfg.output_dir = str(run.out)
            if cfg.wandb.group is None:
                # logger=wandb shows a sweep's runs together, named by their folders.
                cfg.wandb.group = str(directory)
            validate(cfg, check_hardware=check_hardware)
            if cfg.distributed.nproc > 1:
                raise ModeError(
                    f"distributed.nproc={cfg.distributed.nproc}: a sweep runs one process per "
                    "run; start each run with its own `mode train ... distributed.nproc=N`"
                )
            if cfg.init_from is not None and not (run.out / "config.yaml").exists():
                # A sweep from one parent: each new run's fit to it, before the first starts.
                start_from.check(cfg, resolve_source(cfg.model))
        except ModeError as err:
            problems.setdefault(str(err), []).append(run)
            continue
        run.cfg = cfg
        runs.append(run)
    if problems:
        invalid = sum(len(bad) for bad in problems.values())
        lines = [
            f"run {bad[0].index} ({bad[0].label()}): {message}"
            if len(bad) == 1
            else f"runs {', '.join(str(run.index) for run in bad)}: {message}"
            for message, bad in problems.items()
        ]
        raise ModeError(
            f"The sweep was not started: {invalid} of {len(combos)} combinations are invalid:\n"
            + "\n".join(lines)
        )
    # Rewriting an existing sweep's table would lose it, unless its runs are being continued.
    resuming = all(OmegaConf.select(run.cfg, "resume") for run in runs)
    if (directory / SUMMARY_JSON).exists() and not resuming:
        raise ModeError(
            f"{directory} already holds a sweep ({SUMMARY_JSON}); pick another output_dir, or "
            "continue its runs with resume=auto (nothing was changed)"
        )
    return Sweep(directory, list(overrides), swept_keys, runs, recipes_dir)


# ---------------------------------------------------------------------------- running


def run_sweep(sweep: Sweep, console: Console, out: Console) -> int:
    """Run every combination in order; the number of runs that failed.

    The summary files are rewritten after each run; the table is printed on `out` at the end,
    also when the sweep is interrupted.
    """
    sweep.directory.mkdir(parents=True, exist_ok=True)
    earlier = earlier_wall_times(sweep.directory)
    write_summary(sweep)
    try:
        for run in sweep.runs:
            if finished_earlier(run):
                # A continued sweep (resume=auto) keeps what a run finished before.
                run.status, run.wall_s = "ok", earlier.get(str(run.out))
                run.report = latest_report(run.out)
                collect_results(run)
                write_summary(sweep)
                console.print(
                    f"[bold]sweep run {run.index + 1}/{len(sweep.runs)}[/bold] {run.label()}: "
                    f"finished before, kept ({run.out})"
                )
                continue
            console.print(
                f"[bold]sweep run {run.index + 1}/{len(sweep.runs)}[/bold] {run.label()} "
                f"-> {run.out}"
            )
            run.status = "running"
            start = time.perf_counter()
            try:
                recipe = FinetuneRecipe(run.cfg, run.overrides, sweep.recipes_dir)
                recipe.run()
                # A time or step budget (train.max_minutes, train.stop_after_steps) ends a run
                # early with a checkpoint and no report: not a failure, but a partial result.
                run.status = "ok" if recipe.finished else "stopped"
                if recipe.finished:
                    run.report = recipe.report_folder / "report.json"
            except ModeError as err:
                run.status, run.error = "failed", str(err)
                console.print(f"[bold red]run {run.index} failed:[/bold red] {err}", soft_wrap=True)
            except KeyboardInterrupt:
                run.status = "interrupted"
                raise
            except BaseException as err:
                run.status, run.error = "crashed", f"{type(err).__name__}: {err}"
                raise
            finally:
                run.wall_s = time.perf_counter() - start
                if OmegaConf.select(run.cfg, "resume") == "auto":
                    # A continued run: its earlier sittings count too, the work a stop lost included.
                    run.wall_s += earlier.get(str(run.out), 0.0)
                collect_results(run)
                write_summary(sweep)
                # The next run loads its own model: drop this one's before it does.
                gc.collect()
                free_cuda_cache()
    finally:
        print_table(sweep, out)
        console.print(f"sweep: {sweep.directory / SUMMARY_MD}, {sweep.directory / SUMMARY_JSON}")
    return sum(run.status in ("failed", "crashed") for run in sweep.runs)


def finished_earlier(run: SweepRun) -> bool:
    """Whether a continued run (resume=auto) has nothing left to do: its folder holds the
    end-of-training report of step train.max_steps (written after the last checkpoint and the
    adapter) and, when the run merges, the merged model (written last)."""
    if OmegaConf.select(run.cfg, "resume") != "auto":
        return False
    path = latest_report(run.out)
    if path is None:
        return False
    try:
        source = json.loads(path.read_text()).get("source") or {}
    except (OSError, json.JSONDecodeError, AttributeError):
        return False
    if source.get("kind") != "run" or source.get("step") != run.cfg.train.max_steps:
        return False
    return not (
        run.cfg.merge.enabled
        and has_adapter(run.out, run.cfg)
        and not (run.out / MERGED_DIR).is_dir()
    )


def earlier_wall_times(directory: Path) -> dict[str, float]:
    """The wall time of each run (by folder) an earlier invocation of this sweep recorded."""
    path = directory / SUMMARY_JSON
    try:
        runs = json.loads(path.read_text())["runs"] if path.is_file() else []
        return {run["dir"]: run["wall_s"] for run in runs if run.get("wall_s") is not None}
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return {}


def free_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------- results


def train_records(run_dir: Path) -> list[dict]:
    """The training-step records of a run's metrics.jsonl (those with a `loss`), in order."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a killed run
        if isinstance(record, dict) and isinstance(record.get("loss"), int | float):
            records.append(record)
    return records


def final_train_loss(run_dir: Path) -> float | None:
    """The loss of the last record in a run's metrics.jsonl that has one."""
    records = train_records(run_dir)
    return float(records[-1]["loss"]) if records else None


def eval_losses(report: dict) -> dict:
    """Eval loss per head: the final layer, the ensemble (None without one), each other selected
    layer by number."""
    rows = sorted(report["layers"], key=lambda row: row["layer"])
    final = rows[-1]
    ensemble = report.get("ensemble")
    return {
        "final": final["tuned"]["loss"],
        "ensemble": ensemble["tuned"]["loss"] if ensemble else None,
        "layers": {
            str(row["layer"]): row["tuned"]["loss"]
            for row in rows
            if row["selected"] and row["layer"] != final["layer"]
        },
    }


def exact_match(report: dict) -> dict:
    """Answer accuracy by head (`final`, `ensemble`, and `base` for the base before tuning); {}
    when the report scored no answers."""
    answers = report.get("answers")
    if not answers:
        return {}
    scores = {head: score["accuracy"] for head, score in answers["heads"].items()}
    base = (answers.get("base") or {}).get("final")
    if base is not None:
        scores["base"] = base["accuracy"]
    return scores


def collect_results(run: SweepRun) -> None:
    """Fill in a run's train loss, eval losses and answer accuracy from what its folder holds."""
    run.train_loss = final_train_loss(run.out)
    path = run.report or latest_report(run.out)
    if path is None:
        return
    try:
        report = json.loads(path.read_text())
        run.eval_loss = eval_losses(report)
        run.answers = exact_match(report)
    except (json.JSONDecodeError, KeyError, TypeError, IndexError) as err:
        run.eval_loss, run.answers = {}, {}
        run.error = run.error or f"unreadable report {path}: {err}"


# ---------------------------------------------------------------------------- the table


def layer_columns(sweep: Sweep) -> list[str]:
    """The selected layers (other than the final one) any run reports, in order."""
    layers = {int(layer) for run in sweep.runs for layer in run.eval_loss.get("layers", {})}
    return [str(layer) for layer in sorted(layers)]


def _number(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}"


def table_rows(sweep: Sweep) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the comparison table; `-` where a value does not apply or is missing."""
    layers = layer_columns(sweep)
    heads = [h for h in ("final", "ensemble") if any(h in run.answers for run in sweep.runs)]
    header = ["#", "run", "overrides", "train loss", "eval final", "eval ensemble"]
    header += [f"eval L{layer}" for layer in layers] + [f"EM {head}" for head in heads]
    header += ["wall s", "status"]
    rows = []
    for run in sweep.runs:
        evals = run.eval_loss
        rows.append(
            [
                str(run.index),
                run.out.name,
                run.label(),
                _number(run.train_loss),
                _number(evals.get("final")),
                _number(evals.get("ensemble")),
                *(_number(evals.get("layers", {}).get(layer)) for layer in layers),
                *(_number(run.answers.get(head), 3) for head in heads),
                _number(run.wall_s, 1),
                run.status,
            ]
        )
    return header, rows


def seeds_swept(sweep: Sweep) -> bool:
    return SEED_KEY in sweep.swept_keys


def _spread(summary: dict | None, digits: int) -> str:
    """`mean ± std` of a group's metric (`mean` alone for one run, `-` for none)."""
    if summary is None:
        return "-"
    if summary["std"] is None:
        return _number(summary["mean"], digits)
    return f"{_number(summary['mean'], digits)} ± {_number(summary['std'], digits)}"


def _digits(metric: Metric) -> int:
    return 3 if metric.higher_is_better else 4


def group_rows(sweep: Sweep) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the per-group table: mean ± sample std over the seeds, per metric."""
    metrics = metrics_of(sweep.runs)
    header = ["group", "seeds", *(m.label for m in metrics)]
    rows = []
    for group in group_runs(sweep.runs, sweep.swept_keys):
        finished = sorted(seed_of(run) for run in group.runs if run.status == "ok")
        rows.append(
            [
                group.label(),
                ", ".join(map(str, finished)) or "-",
                *(_spread(group.summary(m.key), _digits(m)) for m in metrics),
            ]
        )
    return header, rows


def comparison_rows(sweep: Sweep) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the paired differences: one row per comparison and metric."""
    header = ["comparison", "same", "metric", "seeds", "difference", "95% interval", "excludes 0"]
    rows = []
    metrics = metrics_of(sweep.runs)
    for comparison in comparisons(group_runs(sweep.runs, sweep.swept_keys)):
        for metric in metrics:
            diff = comparison.difference(metric.key)
            if diff is None:
                continue
            digits = _digits(metric)
            interval = (
                f"[{diff['low']:+.{digits}f}, {diff['high']:+.{digits}f}]"
                if diff["low"] is not None
                else "-"
            )
            rows.append(
                [
                    comparison.label(),
                    comparison.shared() or "-",
                    metric.label,
                    str(diff["n"]),
                    f"{diff['mean']:+.{digits}f}",
                    interval,
                    "yes *" if diff["excludes_zero"] else "no",
                ]
            )
    return header, rows


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return lines


def to_markdown(sweep: Sweep) -> str:
    lines = [
        f"# Sweep in {sweep.directory}",
        "",
        f"`mode train -m {' '.join(sweep.overrides)}`",
        "",
        "Train loss: the last logged step. Eval loss: the newest report of each run, per head. "
        "EM: exact-match answer accuracy of the tuned final head and ensemble.",
        "",
        *_markdown_table(*table_rows(sweep)),
    ]
    if seeds_swept(sweep):
        lines += [
            "",
            "## Per group, over seeds",
            "",
            "Runs that differ only in `train.seed`: mean ± sample standard deviation (n - 1) of "
            "each metric over the finished runs. Plot: `sweep.png`, one dot per seed.",
            "",
            *_markdown_table(*group_rows(sweep)),
        ]
        header, rows = comparison_rows(sweep)
        if rows:
            lines += [
                "",
                "## Paired differences",
                "",
                "Groups that differ in one setting, `first - second` per metric, paired by seed "
                "(the two runs with the same seed), averaged over the seeds both finished: mean "
                "and 95% t-interval (mean ± t(n-1) · s / √n). `yes *`: the interval excludes 0. "
                "For losses a negative difference favours the first; for EM a positive one.",
                "",
                *_markdown_table(header, rows),
            ]
    errors = [
        f"- run {run.index}: " + " ".join(line.strip() for line in run.error.splitlines())
        for run in sweep.runs
        if run.error
    ]
    if errors:
        lines += ["", "## Errors", "", *errors]
    return "\n".join(lines) + "\n"


def write_summary(sweep: Sweep) -> None:
    """`sweep.json` and `sweep.md` in the sweep folder, as things stand."""
    summary = {
        "schema": SCHEMA,
        "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "sweep_dir": str(sweep.directory),
        "overrides": sweep.overrides,
        "swept": sweep.swept_keys,
        "runs": [run.to_json() for run in sweep.runs],
        "seeds": summary_json(sweep.runs, sweep.swept_keys) if seeds_swept(sweep) else None,
    }
    (sweep.directory / SUMMARY_JSON).write_text(json.dumps(summary, indent=2) + "\n")
    (sweep.directory / SUMMARY_MD).write_text(to_markdown(sweep))
    if metrics_of(sweep.runs):
        sweep_figure(sweep).savefig(sweep.directory / SUMMARY_PNG, dpi=100)


def sweep_figure(sweep: Sweep):
    """`sweep.png`: one panel per metric, one column per group, one dot per seed (labelled with
    the seed), the group's mean as a bar across its dots."""
    # A bare Figure draws with Agg when saved: no display, no pyplot state.
    from matplotlib.figure import Figure

    metrics = metrics_of(sweep.runs)
    groups = group_runs(sweep.runs, sweep.swept_keys)
    columns = min(3, len(metrics))
    rows = -(-len(metrics) // columns)
    figure = Figure(figsize=(4.2 * columns, 0.6 + 2.9 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax, metric in zip(axes, metrics, strict=False):
        for x, group in enumerate(groups):
            values = group.by_seed(metric.key)
            if not values:
                continue
            seeds = sorted(values)
            ax.scatter(
                [x] * len(seeds),
                [values[s] for s in seeds],
                s=22,
                color="tab:blue",
                label="seeds",
            )
            for seed in seeds:
                ax.annotate(
                    str(seed),
                    (x, values[seed]),
                    xytext=(4, 0),
                    textcoords="offset points",
                    fontsize="x-small",
                    va="center",
                )
            mean = sum(values.values()) / len(values)
            ax.hlines(mean, x - 0.25, x + 0.25, color="tab:orange", linewidth=2)
        ax.set_title(metric.label, fontsize="medium")
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([g.label() for g in groups], rotation=20, ha="right", fontsize="small")
        ax.set_xlim(-0.6, len(groups) - 0.4)
        ax.grid(axis="y", alpha=0.3)
    for ax in axes[len(metrics) :]:
        ax.set_visible(False)
    figure.suptitle("per group: one dot per seed (labelled), mean as a bar", fontsize="medium")
    return figure


def print_table(sweep: Sweep, out: Console) -> None:
    header, rows = table_rows(sweep)
    table = Table(title=f"sweep: {sweep.directory}")
    for name in header:
        # Fold rather than cut: the run names and numbers are what the table is for.
        table.add_column(name, overflow="fold")
    for row in rows:
        style = None if row[-1] == "ok" else "red"
        table.add_row(*row, style=style)
    out.print(table)
    if not seeds_swept(sweep):
        return
    for title, (header, rows) in (
        ("per group: mean ± std over seeds", group_rows(sweep)),
        ("paired by seed: first - second, 95% t-interval", comparison_rows(sweep)),
    ):
        if rows:
            table = Table(title=title)
            for name in header:
                table.add_column(name, overflow="fold")
            for row in rows:
                table.add_row(*row, style="bold" if row[-1].startswith("yes") else None)
            out.print(table)


def print_plan(sweep: Sweep, out: Console) -> None:
    """The runs a sweep would make, for `--dry-run`."""
    table = Table(title=f"sweep plan: {sweep.directory}")
    for name in ("#", "run", "recipe", "overrides"):
        table.add_column(name, overflow="fold")
    for run in sweep.runs:
        table.add_row(str(run.index), run.out.name, run.recipe, run.label())
    out.print(table)
