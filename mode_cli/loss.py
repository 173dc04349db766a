"""The MoDE loss (METHOD.md 5), summed over target tokens; the caller divides by the step's count.

    L = a_ens * CE(z, y) + a_l * sum_{l in S} CE(z_l, y)
        + lambda * T^2 * sum_{l in S, l < N} KL(softmax(z_N / T) || softmax(z_l / T))

`z = W . sum_l w_l Norm_l(h_l)` is the ensemble (one head matmul, since the head is linear),
`z_l = W . Norm_l(h_l)`, and the teacher `z_N` is detached. Inputs hold only target positions:
masked ones (label -100) are dropped by the caller before any head matmul. Every term is computed
in fp32. The per-layer logits are only computed when a per-layer term has weight.

Returning sums, not means, lets gradient accumulation divide by the number of target tokens of the
whole optimizer step, so every token weighs the same however the step is split into micro-batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mode_cli.head import MoDEHead


@dataclass(frozen=True)
class LossWeights:
    """a_ens, a_l (the same for every selected layer), lambda and T of the formula above."""

    ensemble: float = 1.0
    layer: float = 0.0
    distill: float = 0.1
    temperature: float = 1.0


@dataclass
class LossSums:
    """The objective summed over tokens, with its parts (detached) for logging."""

    total: torch.Tensor
    tokens: int
    parts: dict[str, float] = field(default_factory=dict)


def head_logits(lm_head: nn.Module, states: torch.Tensor) -> torch.Tensor:
    """Logits in fp32 from the (frozen, possibly lower-precision) LM head."""
    return lm_head(states.to(lm_head.weight.dtype)).float()


def mode_loss(
    normed: torch.Tensor,
    weights: torch.Tensor,
    labels: torch.Tensor,
    lm_head: nn.Module,
    loss_weights: LossWeights,
) -> LossSums:
    """The MoDE objective for `T` target tokens.

    Args:
        normed: `[|S|, T, H]` normalised states of the selected layers, layer N last.
        weights: `[T, |S|]` routing weights.
        labels: `[T]` target token ids (no -100 left).
        lm_head: the model's shared output projection.
    """
    ensemble_logits = head_logits(lm_head, MoDEHead.mix(normed, weights))
    ce_ensemble = F.cross_entropy(ensemble_logits, labels, reduction="sum")
    total = loss_weights.ensemble * ce_ensemble
    parts = {"ce_ensemble": ce_ensemble.item()}

    if loss_weights.layer > 0 or loss_weights.distill > 0:
        layer_logits = head_logits(lm_head, normed)  # [|S|, T, V]
        if loss_weights.layer > 0:
            ce_layers = sum(
                F.cross_entropy(logits, labels, reduction="sum") for logits in layer_logits
            )
            total = total + loss_weights.layer * ce_layers
            parts["ce_layers"] = ce_layers.item()
        if loss_weights.distill > 0 and len(layer_logits) > 1:
            distill = distillation(layer_logits[:-1], layer_logits[-1], loss_weights.temperature)
            total = total + loss_weights.distill * distill
            parts["distill"] = distill.item()
    return LossSums(total=total, tokens=labels.numel(), parts=parts)


def distillation(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """`T^2 * sum KL(softmax(teacher/T) || softmax(student_l/T))` over layers and tokens."""
    teacher_logp = F.log_softmax(teacher.detach() / temperature, dim=-1)
    student_logp = F.log_softmax(student / temperature, dim=-1)
    kl = F.kl_div(
        student_logp, teacher_logp.expand_as(student_logp), log_target=True, reduction="sum"
    )
    return temperature**2 * kl


def final_only_loss(
    final_normed: torch.Tensor, labels: torch.Tensor, lm_head: nn.Module
) -> LossSums:
    """Plain causal-LM cross-entropy on the final layer: the QLoRA baseline, no MoDE head."""
    ce = F.cross_entropy(head_logits(lm_head, final_normed), labels, reduction="sum")
    return LossSums(total=ce, tokens=labels.numel(), parts={"ce_final": ce.item()})
