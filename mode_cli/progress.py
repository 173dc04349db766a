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
    """A context manager around rich's Progress; `update` after every optimizer step."""

    def __init__(self, total_steps: int, console: Console) -> None:
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
        )
        self.task = self.progress.add_task("train", total=total_steps, loss="-", lr="-", tps="-")

    def __enter__(self) -> TrainingProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def update(self, step: int, *, loss: float, lr: float, tokens_per_s: float) -> None:
        self.progress.update(
            self.task,
            completed=step,
            loss=f"{loss:.4f}",
            lr=f"{lr:.2e}",
            tps=f"{tokens_per_s:,.0f}",
        )
