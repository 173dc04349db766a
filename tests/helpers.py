"""Small modules the loss and head tests share."""

from __future__ import annotations

import torch
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
