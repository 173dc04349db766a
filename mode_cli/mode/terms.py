"""The terms of the MoDE loss: their weights, which of them a call computes, and what it returns.

    L = a_ens * CE(z, y) + sum_{l in S} a_l * CE(z_l, y)
        + lambda * T^2 * sum_{students l} KL(softmax(teacher / T) || softmax(z_l / T))

Shared by the two implementations of the loss (`loss.mode_loss`, the naive reference, and
`chunked.chunked_mode_loss`); see `docs/method.md`, "Loss".
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch
from torch import nn

LogitFn = Callable[[torch.Tensor], torch.Tensor]

TEACHERS = ("final", "ensemble")


@dataclass(frozen=True)
class LossWeights:
    """The coefficients of the formula above.

    Attributes:
        ensemble: a_ens, on the routed ensemble's cross-entropy.
        layers: a_l for each selected layer (ascending, layer N last); `()` means all zero.
        distill: lambda, on the distillation term.
        temperature: T of the distillation (the term is scaled by T^2).
        teacher: `final` (teacher z_N, students l < N) or `ensemble` (teacher z, students all l).
    """

    ensemble: float = 1.0
    layers: tuple[float, ...] = ()
    distill: float = 0.1
    temperature: float = 1.0
    teacher: str = "final"

    def __post_init__(self) -> None:
        if self.teacher not in TEACHERS:
            raise ValueError(f"teacher must be one of {TEACHERS}, got {self.teacher!r}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if min((self.ensemble, self.distill, *self.layers)) < 0:
            raise ValueError(f"loss weights must be non-negative, got {self}")

    def per_layer(self, num_selected: int) -> tuple[float, ...]:
        """a_l for each of the `num_selected` layers (zeros when `layers` is empty)."""
        if not self.layers:
            return (0.0,) * num_selected
        if len(self.layers) != num_selected:
            raise ValueError(
                f"loss weights name {len(self.layers)} per-layer weights for {num_selected} layers"
            )
        return tuple(float(a) for a in self.layers)


@dataclass
class LossSums:
    """The objective summed over tokens, with its parts (detached floats) for logging.

    Parts, each summed over tokens and without its outer coefficient: `ce_ensemble` = CE(z, y)
    (when a_ens > 0), `ce_layers` = sum_l a_l CE(z_l, y) (when some a_l > 0), `distill` =
    T^2 sum_students KL (when lambda > 0 and there are students).
    """

    total: torch.Tensor
    tokens: int
    parts: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class TermPlan:
    """Which logits a call needs and how each row of them enters the loss."""

    a_ens: float
    a_layers: tuple[float, ...]
    distill: float
    temperature: float
    students: int  # students are layer rows 0..students-1 (the lowest layers)
    teacher_is_ensemble: bool
    layer_logits: bool  # per-layer head matmuls needed
    ensemble_logits: bool  # the ensemble's logits needed

    @property
    def logit_rows(self) -> int:
        """How many `[chunk, V]` logits tensors one chunk materialises."""
        return int(self.ensemble_logits) + (len(self.a_layers) if self.layer_logits else 0)


def plan_terms(num_selected: int, has_router: bool, w: LossWeights) -> TermPlan:
    """The terms a call with `num_selected` layers (and a router or not) computes under `w`."""
    a_layers = w.per_layer(num_selected)
    teacher_is_ensemble = w.teacher == "ensemble"
    students = num_selected if teacher_is_ensemble else num_selected - 1
    distill = w.distill if students > 0 else 0.0
    if not has_router and (w.ensemble > 0 or (distill > 0 and teacher_is_ensemble)):
        raise ValueError(
            "without routing weights there is no ensemble: set the ensemble weight to 0 "
            "and use teacher='final'"
        )
    return TermPlan(
        a_ens=w.ensemble,
        a_layers=a_layers,
        distill=distill,
        temperature=w.temperature,
        students=students if distill > 0 else 0,
        teacher_is_ensemble=teacher_is_ensemble,
        layer_logits=any(a > 0 for a in a_layers) or distill > 0,
        ensemble_logits=w.ensemble > 0 or (distill > 0 and teacher_is_ensemble),
    )


def parts_of(plan: TermPlan, ce_ens, ce_layers, distill) -> dict[str, torch.Tensor]:
    """The parts `LossSums` logs: those of the terms that have weight."""
    parts = {}
    if plan.a_ens > 0:
        parts["ce_ensemble"] = ce_ens
    if any(a > 0 for a in plan.a_layers):
        parts["ce_layers"] = ce_layers
    if plan.distill > 0:
        parts["distill"] = distill
    return parts


def sums_of(total: torch.Tensor, tokens: int, parts: dict) -> LossSums:
    """The loss sums, with the parts turned into floats."""
    # One host sync for all the logged parts.
    values = torch.stack([p.detach().float() for p in parts.values()]).tolist() if parts else []
    return LossSums(total=total, tokens=tokens, parts=dict(zip(parts, values, strict=True)))


def fp32_arithmetic(tensor: torch.Tensor) -> AbstractContextManager:
    """Autocast off on `tensor`'s device: the loss computes in fp32 whatever the caller's autocast.

    A bf16 step (`train.precision=bf16`) runs under autocast, which would otherwise run the head
    matmuls, the KL's entropy and cross sums and the gradient matmuls in bf16: the KL is a
    difference of two sums of size ~log V, and bf16 rounding of each cancels most of its digits.
    """
    return torch.autocast(tensor.device.type, enabled=False)


def head_logits(
    lm_head: nn.Module, states: torch.Tensor, logit_fn: LogitFn | None = None
) -> torch.Tensor:
    """Logits in fp32 from the (frozen, possibly lower-precision) LM head, then `logit_fn`."""
    logits = lm_head(states.to(lm_head.weight.dtype)).float()
    return logit_fn(logits) if logit_fn is not None else logits


# The QLoRA baseline's weights: one layer (the final one), plain cross-entropy.
FINAL_ONLY = LossWeights(ensemble=0.0, layers=(1.0,), distill=0.0)
