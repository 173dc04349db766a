"""The MoDE loss, summed over target tokens; the caller divides by the step's count.

    L = a_ens * CE(z, y) + sum_{l in S} a_l * CE(z_l, y)
        + lambda * T^2 * sum_{students l} KL(softmax(teacher / T) || softmax(z_l / T))

`z_l = f(W . Norm_l(h_l) + b)` and the ensemble `z = f(W . sum_l w_l Norm_l(h_l) + b)`: the head is
linear, so one head matmul on the mixed states gives the mix of the raw logits. `f` is the model's
optional elementwise logit function (Gemma 2's final-logit soft-capping), applied to every logits
tensor; for the ensemble it acts after the mix (our documented choice). The teacher is `z_N`
(students: every l < N) or the ensemble `z` (students: every l in S), always detached. See
`docs/method.md`, "Loss".

Inputs hold only target positions: masked ones (label -100) are dropped by the caller before any
head matmul. Every term is computed in fp32, also under the caller's autocast (turned off inside;
a lower-precision LM head still projects in its own dtype, into fp32 logits). Per-layer logits are only computed when a per-layer
term has weight. Returning sums, not means, lets gradient accumulation divide by the number of
target tokens of the whole optimizer step, so every token weighs the same however the step is split.

Two implementations of the same function, picked by `loss.impl` (`IMPLEMENTATIONS`):
- `mode_loss` (here): the naive reference, plain autograd over full `[T, V]` logits;
- `chunked_mode_loss` (`chunked.py`): the default, which walks the tokens in chunks so one chunk's
  logits live at a time (`docs/benchmarks.md`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mode_cli.mode.chunked import DEFAULT_CHUNK_BUDGET, chunked_mode_loss
from mode_cli.mode.terms import (
    FINAL_ONLY,
    LogitFn,
    LossSums,
    LossWeights,
    fp32_arithmetic,
    head_logits,
    parts_of,
    plan_terms,
    sums_of,
)


def mode_loss(
    normed: torch.Tensor,
    weights: torch.Tensor | None,
    labels: torch.Tensor,
    lm_head: nn.Module,
    loss_weights: LossWeights,
    logit_fn: LogitFn | None = None,
) -> LossSums:
    """The MoDE objective for `T` target tokens: the naive reference, full logits and autograd.

    Holds several `[T, V]` fp32 tensors per selected layer (and as many again in backward); use
    `chunked_mode_loss` for training. Kept as the readable definition the chunked loss is tested
    against.

    Args:
        normed: `[|S|, T, H]` normalised states of the selected layers, layer N last.
        weights: `[T, |S|]` routing weights, or None without a router (no ensemble term then).
        labels: `[T]` target token ids (no -100 left).
        lm_head: the model's shared output projection (frozen).
        loss_weights: the coefficients of the terms.
        logit_fn: elementwise function applied to every logits tensor after the head.
    """
    with fp32_arithmetic(normed):
        return _mode_loss(normed, weights, labels, lm_head, loss_weights, logit_fn)


def _mode_loss(normed, weights, labels, lm_head, loss_weights, logit_fn) -> LossSums:
    plan = plan_terms(normed.shape[0], weights is not None, loss_weights)
    normed = normed.float()
    zero = normed.new_zeros(())
    total, ce_ens, ce_layers, distill = zero, zero, zero, zero
    ensemble_logits = None
    if plan.ensemble_logits:
        mixed = torch.einsum("sth,ts->th", normed, weights.float())
        ensemble_logits = head_logits(lm_head, mixed, logit_fn)
        if plan.a_ens > 0:
            ce_ens = F.cross_entropy(ensemble_logits, labels, reduction="sum")
            total = total + plan.a_ens * ce_ens
    if plan.layer_logits:
        layer_logits = head_logits(lm_head, normed, logit_fn)  # [|S|, T, V]
        for a, logits in zip(plan.a_layers, layer_logits, strict=True):
            if a > 0:
                ce_layers = ce_layers + a * F.cross_entropy(logits, labels, reduction="sum")
        total = total + ce_layers
        if plan.distill > 0:
            teacher = ensemble_logits if plan.teacher_is_ensemble else layer_logits[-1]
            distill = distillation(layer_logits[: plan.students], teacher, plan.temperature)
            total = total + plan.distill * distill
    parts = parts_of(plan, ce_ens, ce_layers, distill)
    return sums_of(total, labels.numel(), parts)


def distillation(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """`T^2 * sum KL(softmax(teacher/T) || softmax(student_l/T))` over layers and tokens."""
    teacher_logp = F.log_softmax(teacher.detach() / temperature, dim=-1)
    student_logp = F.log_softmax(student / temperature, dim=-1)
    kl = F.kl_div(
        student_logp, teacher_logp.expand_as(student_logp), log_target=True, reduction="sum"
    )
    return temperature**2 * kl


def final_only_loss(
    final_normed: torch.Tensor,
    labels: torch.Tensor,
    lm_head: nn.Module,
    logit_fn: LogitFn | None = None,
    impl: str = "chunked",
    chunk_budget: int = DEFAULT_CHUNK_BUDGET,
) -> LossSums:
    """Plain causal-LM cross-entropy on the final layer: the QLoRA baseline, no MoDE head.

    The general loss with one layer, no router and `FINAL_ONLY` weights, through the same
    implementation as MoDE's so that A/B runs compare like with like. Its part is logged as
    `ce_final`.
    """
    args = (final_normed.unsqueeze(0), None, labels, lm_head, FINAL_ONLY, logit_fn)
    if impl == "chunked":
        sums = chunked_mode_loss(*args, chunk_budget=chunk_budget)
    else:
        sums = IMPLEMENTATIONS[impl](*args)
    return LossSums(sums.total, sums.tokens, {"ce_final": sums.parts["ce_layers"]})


# `loss.impl` in a recipe picks one of these.
IMPLEMENTATIONS = {"chunked": chunked_mode_loss, "naive": mode_loss}
