"""The training progress display: step, loss, learning rate, tokens/s and ETA, on one rich bar."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class TrainingProgress:
    """A context manager around rich's Progress; `update` after every optimizer step.

    Without a terminal (CI logs, `| tee`), a live bar would only show at the end: print a plain
    line every `log_every` steps instead.
    """

    def __init__(self, total_steps: int, console: Console, log_every: int = 1) -> None:
        self.console = console
        self.total = total_steps
        self.log_every = log_every
        self.progress = Progress(
            TextColumn("[bold]step"),
            MofNCompleteColumn(),
            BarColumn(),
            TextColumn("loss [cyan]{task.fields[loss]}"),
            TextColumn("lr {task.fields[lr]}"),
            TextColumn("{task.fields[tps]} tok/s"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
            disable=not console.is_terminal,
        )
        self.task = self.progress.add_task("train", total=total_steps, loss="-", lr="-", tps="-")

    def __enter__(self) -> TrainingProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def update(self, step: int, *, loss: float, lr: float, tokens_per_s: float) -> None:
        if not self.console.is_terminal and (step % self.log_every == 0 or step == self.total):
            elapsed = self.progress.tasks[0].elapsed or 0.0
            remaining = elapsed / step * (self.total - step)
            self.console.print(
                f"step {step}/{self.total}  loss {loss:.4f}  lr {lr:.2e}  "
                f"{tokens_per_s:,.0f} tok/s  elapsed {elapsed:.0f}s  eta {remaining:.0f}s",
                highlight=False,
            )
        self.progress.update(
            self.task,
            completed=step,
            loss=f"{loss:.4f}",
            lr=f"{lr:.2e}",
            tps=f"{tokens_per_s:,.0f}",
        )
