"""What several test files share: a stand-in norm, a tiny training run, data and metrics helpers."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn


class RMSNorm(nn.Module):
    """An RMSNorm with non-trivial weights, standing in for a model's final norm."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def train_tiny(mode, out, *overrides: str, recipe: str = "tiny-llama-alpaca") -> None:
    """`mode train recipe=<tiny recipe> output_dir=OUT merge=false OVERRIDES...`, which must succeed."""
    code, _, err = mode("train", f"recipe={recipe}", f"output_dir={out}", "merge=false", *overrides)
    assert code == 0, err


def records(run: Path) -> list[dict]:
    """Every record of a run's metrics.jsonl."""
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def data_cfg(**values):
    """A `data` section of the schema with these values."""
    from mode_cli.config import DataConfig

    return OmegaConf.merge(OmegaConf.structured(DataConfig), values)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path
