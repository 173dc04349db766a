"""What a training run shows and records: the live progress line, metrics.jsonl (and TensorBoard
events with `logger=tensorboard`, a Weights & Biases run with `logger=wandb`), and the summary
table at the end."""

from __future__ import annotations

import json
import os
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from mode_cli.errors import ModeError
from mode_cli.files import read_text

METRICS_FILE = "metrics.jsonl"
# `logger`: metrics.jsonl always; `tensorboard` also writes TensorBoard events; `wandb` also logs to
# Weights & Biases (the optional `wandb` package).
LOGGERS = ("none", "tensorboard", "wandb")
WANDB_INSTALL = 'pip install "mode-cli[wandb]"'


def logger_problems(logger: str) -> list[str]:
    """What stops `logger` from working here: the wandb package missing for `logger=wandb`."""
    if logger != "wandb":
        return []
    try:
        import wandb  # noqa: F401
    except ImportError:
        return [f"logger=wandb needs the wandb package, which is not installed: {WANDB_INSTALL}"]
    return []


class TrainingProgress:
    """A context manager around rich's Progress; `update` after every optimizer step.

    Shows step, epoch, loss, the latest eval loss, learning rate, tokens/s, peak CUDA memory and
    the ETA. Without a terminal (CI logs, `| tee`), a live bar would only show at the end: print a
    plain line every `log_every` steps instead. A resumed run starts the bar at `start_step`.
    """

    def __init__(
        self, total_steps: int, console: Console, log_every: int = 1, start_step: int = 0
    ) -> None:
        self.console = console
        self.total = total_steps
        self.log_every = log_every
        self.start_step = start_step
        self.eval_loss = "-"
        self.progress = Progress(
            TextColumn("[bold]step"),
            MofNCompleteColumn(),
            BarColumn(),
            TextColumn("epoch {task.fields[epoch]}"),
            TextColumn("loss [cyan]{task.fields[loss]}"),
            TextColumn("eval [magenta]{task.fields[eval]}"),
            TextColumn("lr {task.fields[lr]}"),
            TextColumn("{task.fields[tps]} tok/s"),
            TextColumn("{task.fields[memory]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
            disable=not console.is_terminal,
        )
        self.task = self.progress.add_task(
            "train",
            total=total_steps,
            completed=start_step,
            loss="-",
            eval="-",
            lr="-",
            tps="-",
            epoch="-",
            memory="",
        )

    def __enter__(self) -> TrainingProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def update(
        self,
        step: int,
        *,
        loss: float,
        lr: float,
        tokens_per_s: float,
        epoch: float,
        peak_memory_gb: float | None = None,
    ) -> None:
        memory = f"peak {peak_memory_gb:.1f} GB" if peak_memory_gb is not None else ""
        if not self.console.is_terminal and (step % self.log_every == 0 or step == self.total):
            elapsed = self.progress.tasks[0].elapsed or 0.0
            remaining = elapsed / max(1, step - self.start_step) * (self.total - step)
            evaluated = f"eval {self.eval_loss}  " if self.eval_loss != "-" else ""
            self.console.print(
                f"step {step}/{self.total}  epoch {epoch:.2f}  loss {loss:.4f}  {evaluated}"
                f"lr {lr:.2e}  {tokens_per_s:,.0f} tok/s  {memory + '  ' if memory else ''}"
                f"elapsed {elapsed:.0f}s  eta {remaining:.0f}s",
                highlight=False,
                soft_wrap=True,
            )
        self.progress.update(
            self.task,
            completed=step,
            loss=f"{loss:.4f}",
            eval=self.eval_loss,
            lr=f"{lr:.2e}",
            tps=f"{tokens_per_s:,.0f}",
            epoch=f"{epoch:.2f}",
            memory=memory,
        )

    def show_eval(self, step: int, result: dict) -> None:
        """The eval split's losses at `step`: the ensemble's (or the final layer's) on the bar."""
        main = result["ensemble"] if result["ensemble"] is not None else result["final"]
        self.eval_loss = f"{main:.4f}"
        layers = "  ".join(f"L{layer} {loss:.4f}" for layer, loss in result["layers"].items())
        ensemble = "" if result["ensemble"] is None else f"  ensemble {result['ensemble']:.4f}"
        self.console.print(
            f"eval @ step {step}: {layers}{ensemble}", highlight=False, soft_wrap=True
        )


class MetricsLog:
    """One JSON record per line in metrics.jsonl, mirrored to TensorBoard with `logger=tensorboard`.

    A run resumed from the checkpoint of step `resume_step` first drops the records after that
    step (the steps it is about to redo), in metrics.jsonl and in the TensorBoard events. With
    several processes only rank 0 logs (`enabled` is false elsewhere: nothing is written).
    """

    def __init__(
        self,
        out: Path,
        logger: str = "none",
        resume_step: int | None = None,
        tracker: WandbRun | None = None,
        enabled: bool = True,
    ) -> None:
        """`tracker`: the run's Weights & Biases run (`logger=wandb`), which outlives this log:
        the report after training goes to it too. `enabled=False` (a rank other than 0 of a
        distributed job): nothing is written."""
        self.path = out / METRICS_FILE
        self.file = self.writer = None
        self.tracker = tracker if enabled else None
        if not enabled:
            return
        if resume_step is not None:
            truncate_after(self.path, resume_step)
        self.file = self.path.open("a")
        if logger == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            purge = resume_step + 1 if resume_step is not None else None
            self.writer = SummaryWriter(log_dir=str(out / "tensorboard"), purge_step=purge)

    def write(self, record: dict) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            step = record["step"]
            for tag, value in scalars(record):
                self.writer.add_scalar(tag, value, step)
            self.writer.flush()
        if self.tracker is not None:
            self.tracker.log(record)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def scalars(record: dict) -> list[tuple[str, float]]:
    """TensorBoard tags of one record: `train/<key>` for a step, `eval/...` for an evaluation."""
    if "eval" in record:
        result = record["eval"]
        tags = [("eval/final", result["final"])]
        tags += [(f"eval/layer_{layer}", loss) for layer, loss in result["layers"].items()]
        if result["ensemble"] is not None:
            tags.append(("eval/ensemble", result["ensemble"]))
        tags += [(f"router/layer_{layer}", w) for layer, w in result["router"].items()]
        return tags
    return [
        (f"train/{key}", float(value))
        for key, value in record.items()
        if key != "step" and isinstance(value, int | float) and not isinstance(value, bool)
    ]


class WandbRun:
    """The run in Weights & Biases (`logger=wandb`): the resolved config, every metrics record
    (`train/*`, `eval/*`, `router/*` by step, as in TensorBoard), and the eval report: its
    per-layer table, answer accuracy and `layers.png`. The summary keeps each key's last value,
    so `train/loss` is the last step's loss.

    Where runs go is wandb's own business: `WANDB_MODE=offline` writes them locally (`wandb sync`
    uploads them later), `WANDB_DIR` sets the folder (default: the run folder, `<out>/wandb/`).
    `wandb.project`, `wandb.entity`, `wandb.group`, `wandb.name` and `wandb.tags` come from the
    recipe; a sweep groups its runs under the sweep folder. A resumed run continues the W&B run
    recorded in `<out>/wandb-run-id`.
    """

    ID_FILE = "wandb-run-id"

    def __init__(self, cfg, out: Path, resume_step: int | None = None) -> None:
        import wandb
        from omegaconf import OmegaConf

        self.wandb = wandb
        settings = cfg.wandb
        id_file = out / self.ID_FILE
        run_id = (
            read_text(id_file).strip() if resume_step is not None and id_file.is_file() else None
        )
        self.run = wandb.init(
            project=settings.project,
            entity=settings.entity,
            group=settings.group,
            name=settings.name or out.name,
            tags=list(settings.tags) or None,
            config=OmegaConf.to_container(cfg, resolve=True),
            # Read here, not by wandb: its settings are read once per process, and a sweep or a
            # notebook may change WANDB_DIR between runs.
            dir=os.environ.get("WANDB_DIR") or str(out),
            id=run_id,
            resume="allow" if run_id else None,
            # mode draws its own progress line; wandb's console capture would wrap it.
            settings=wandb.Settings(console="off"),
        )
        id_file.write_text(self.run.id + "\n")
        self.step = resume_step or 0

    def log(self, record: dict) -> None:
        self.step = max(self.step, record["step"])
        self.run.log(dict(scalars(record)), step=record["step"])

    def log_report(self, report: dict, folder: Path) -> None:
        """The eval report: the per-layer table, answer accuracy, and `layers.png`."""
        from mode_cli.eval.render import (
            ANSWER_COLUMNS,
            answer_scores,
            answers_model,
            answers_rows,
            header,
        )
        from mode_cli.eval.render import table_rows as layer_rows

        wandb = self.wandb
        logged = {
            "report/layers": wandb.Table(columns=header(report), data=layer_rows(report)),
            "report/layers_png": wandb.Image(str(folder / "layers.png")),
        }
        summary = {"report/final_loss": report["layers"][-1]["tuned"]["loss"]}
        if report["ensemble"]:
            summary["report/ensemble_loss"] = report["ensemble"]["tuned"]["loss"]
        answers = report.get("answers")
        if answers:
            rows = answers_rows(answers, answers_model(report))
            logged["report/answers"] = wandb.Table(columns=list(ANSWER_COLUMNS), data=rows)
            for side, head, score in answer_scores(answers, answers_model(report)):
                summary[f"report/exact_match/{side}_{head}"] = score["accuracy"]
        self.run.log(logged, step=self.step)
        self.run.summary.update(summary)

    def finish(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


def truncate_after(path: Path, step: int) -> None:
    """Keep only the records of steps <= `step` (atomically: a crash leaves the old file).

    A last line cut short by a killed process is dropped; any other line that is not a record
    stops the resume with its line number, the file unchanged.
    """
    if not path.is_file():
        return
    text = read_text(path)
    lines = text.splitlines()
    if lines and not text.endswith("\n"):
        lines = lines[:-1] if not is_record(lines[-1]) else lines
    kept = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if not is_record(line):
            raise ModeError(
                f"{path}, line {number}: not a metrics record; fix or remove that line to resume"
            )
        if json.loads(line)["step"] <= step:
            kept.append(line)
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    staging.write_text("".join(line + "\n" for line in kept))
    os.replace(staging, path)


def is_record(line: str) -> bool:
    """A JSON object with a step number, as every metrics record holds."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return False
    step = record.get("step") if isinstance(record, dict) else None
    return isinstance(step, int) and not isinstance(step, bool)


def print_summary(console: Console, summary: dict) -> None:
    """The end-of-run table: steps, losses, speed, time, skipped steps, checkpoints."""
    table = Table("", "", title="training summary", show_header=False)
    for key, value in summary.items():
        if isinstance(value, float):
            value = f"{value:,.4f}" if "loss" in key else f"{value:,.1f}"
        table.add_row(key, "-" if value is None else str(value))
    console.print(table)
