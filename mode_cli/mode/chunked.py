"""The chunked MoDE loss: `loss.mode_loss`'s objective with one chunk's logits alive at a time.

Per selected layer, logits are tokens x vocab: at Llama-3's 128,256 vocab one 2,048-token sequence
is 1 GB of fp32 logits per layer, and a naive MoDE loss keeps several such tensors (and as many
gradients) alive. Here the target tokens are walked in chunks, every term of a chunk is computed
in fp32, and the input gradients are computed analytically chunk by chunk in the forward pass (a
custom `torch.autograd.Function`), so the peak is about two chunk blocks whatever the token count.
The tests hold it to the naive reference (`loss.mode_loss`); `scripts/bench_loss.py` measures it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mode_cli.mode.terms import (
    LogitFn,
    LossSums,
    LossWeights,
    TermPlan,
    fp32_arithmetic,
    parts_of,
    plan_terms,
    sums_of,
)

# The most elements of one chunk's fp32 logits block `[rows, chunk, V]` (256 MiB). Large enough
# that each chunk's head matmul is an efficient GEMM (about 130 tokens x 4 rows at Llama-3's
# 128,256 vocab, 520 at 32k) and per-chunk overheads vanish, small enough to be noise next to a
# QLoRA step of an 8B model. The chunked loss holds about two blocks at its peak, whatever the
# token count. (On a 2-core CPU, budgets of 2^22 and 2^20 made long batches' loss 2-6x slower:
# small GEMMs.) A ceiling, not an allocation: a small batch's block holds at most its own
# `[tokens, V]` logits (`chunk_size`).
DEFAULT_CHUNK_BUDGET = 2**26


def chunked_mode_loss(
    normed: torch.Tensor,
    weights: torch.Tensor | None,
    labels: torch.Tensor,
    lm_head: nn.Module,
    loss_weights: LossWeights,
    logit_fn: LogitFn | None = None,
    chunk_budget: int = DEFAULT_CHUNK_BUDGET,
) -> LossSums:
    """The MoDE objective of `mode_loss`, computed chunk by chunk over the tokens.

    Memory (`docs/method.md`, "Implementation"; `docs/benchmarks.md`): tokens are walked in
    chunks sized so that one chunk's fp32 logits block `[rows, chunk, V]` holds at most
    `chunk_budget` elements (rows: |S| when a per-layer term has weight, plus 1 for the
    ensemble), and at most the `T x V` logits of the batch itself: a batch of a few hundred
    tokens splits into `rows` chunks, so MoDE holds no more logits than the final-only baseline
    on the same batch, instead of a budget sized for long batches. Only one chunk's block is
    alive at a time. The gradient with respect to `normed` and `weights` is computed chunk by
    chunk during the forward pass, analytically from the softmaxes (`d CE / dz = p - onehot(y)`,
    `d T^2 KL / dz_l = T (q_l - p_teacher)`), and kept: it is the size of the inputs, tiny next
    to the logits. Backward only scales it by the incoming gradient, so the head matmul is paid
    once forward and once for the input gradient, never recomputed (recomputing the chunk in
    backward would pay the forward matmul twice for the same memory). Gradients then flow on to
    whatever produced `normed` and `weights` (LoRA, per-layer norms, router).

    Cost: when per-layer logits are computed anyway, the ensemble's raw logits are mixed from them
    (`sum_l w_l z_l`, equal to `W . sum_l w_l x_l` for a linear head) instead of a fourth head
    matmul, and its gradient folds into the layers' rows. So MoDE with distillation costs |S| head
    matmuls forward and |S| backward (the final-only baseline: 1 and 1); without per-layer terms it
    costs one each way, like the baseline. Each logits row is log-softmaxed once (shared by its CE
    and KL when T = 1), the teacher once per chunk. A chunk holds its `[|S|, c, V]` block plus a
    few `[c, V]` rows, all reused across chunks: about two budgets at the peak in total.

    The LM head is treated as frozen: it receives no gradient, even if its weight requires one.
    The gradient is stored for one backward pass (no double backward).

    Args: as `mode_loss`, plus
        chunk_budget: the most elements of one chunk's fp32 logits block (default
            `DEFAULT_CHUNK_BUDGET`).
    """
    num_selected, num_tokens, _ = normed.shape
    plan = plan_terms(num_selected, weights is not None, loss_weights)
    weight = lm_head.weight
    bias = getattr(lm_head, "bias", None)
    grad_inputs = [normed] + ([weights] if weights is not None else [])
    need_grad = torch.is_grad_enabled() and any(t.requires_grad for t in grad_inputs)
    if need_grad and (weight.requires_grad or (bias is not None and bias.requires_grad)):
        warnings.warn(
            "chunked_mode_loss gives the LM head no gradient; freeze it, or use mode_loss",
            stacklevel=2,
        )
    chunk = _chunk_size(plan, weight.shape[0], chunk_budget, num_tokens)
    with fp32_arithmetic(normed):  # the caller's autocast would run the chunk's math in bf16
        total, ce_ens, ce_layers, distill = _ChunkedLoss.apply(
            normed, weights, labels, weight, bias, plan, logit_fn, chunk, need_grad
        )
    return sums_of(total, num_tokens, parts_of(plan, ce_ens, ce_layers, distill))


def chunk_size(
    loss_weights: LossWeights,
    num_selected: int,
    vocab: int,
    has_router: bool = True,
    chunk_budget: int = DEFAULT_CHUNK_BUDGET,
    tokens: int | None = None,
) -> int:
    """Tokens per chunk of `chunked_mode_loss` on `tokens` target tokens (None: no cap from the
    batch): the most whose `[rows, chunk, V]` block fits the budget and holds no more than the
    batch's own `tokens x V` logits."""
    plan = plan_terms(num_selected, has_router, loss_weights)
    return _chunk_size(plan, vocab, chunk_budget, tokens)


def peak_logits(
    loss_weights: LossWeights,
    num_selected: int,
    vocab: int,
    has_router: bool = True,
    tokens: int | None = None,
    chunk_budget: int = DEFAULT_CHUNK_BUDGET,
    softcapped: bool = False,
) -> int:
    """Elements of the fp32 logits buffers `chunked_mode_loss` holds at once on `tokens` target
    tokens (None: a batch too long to cap the chunk): the chunk's `[rows, c, V]` block and the
    `[c, V]` rows of its workspace, as `_chunk` uses them. What a memory plan counts for the loss
    (`mode_cli/train/memory.py`)."""
    plan = plan_terms(num_selected, has_router, loss_weights)
    if not plan.logit_rows:
        return 0
    chunk = _chunk_size(plan, vocab, chunk_budget, tokens)
    if tokens is not None:
        chunk = min(chunk, tokens)
    if not plan.layer_logits:
        buffers = 2  # the block's one row (the mixed states' logits) and the log-softmax row
    else:
        buffers = num_selected  # the block: one row per selected layer
        buffers += 2 if plan.ensemble_logits else 1  # the mixed row and its log-softmax; or one
        buffers += 2 if plan.students else 0  # the teacher's log-softmax and softmax
        buffers += 2 if plan.students and plan.temperature != 1.0 else 0  # z / T, log q
    if softcapped:
        buffers += 3  # each row's capped copy, its input kept for the chain rule, its gradient
    return buffers * chunk * vocab


def _chunk_size(plan: TermPlan, vocab: int, chunk_budget: int, tokens: int | None = None) -> int:
    rows = max(1, plan.logit_rows)
    chunk = max(1, chunk_budget // (rows * vocab))
    if tokens is not None:
        # The budget is a ceiling: the rows of a small batch's block share its tokens, so the
        # block is the size of the final-only loss's one row on the same batch.
        chunk = min(chunk, max(1, -(-tokens // rows)))
    return chunk


class _ChunkedLoss(torch.autograd.Function):
    """Loss sums forward; the input gradients, computed during forward, scaled in backward."""

    @staticmethod
    def forward(ctx, normed, weights, labels, weight, bias, plan, logit_fn, chunk, need_grad):
        num_selected, num_tokens, _ = normed.shape
        sums = normed.new_zeros(4, dtype=torch.float32)  # total, ce_ens, ce_layers, distill
        grad_normed = torch.zeros_like(normed, dtype=torch.float32) if need_grad else None
        grad_weights = (
            torch.zeros_like(weights, dtype=torch.float32)
            if need_grad and weights is not None
            else None
        )
        ws = _Workspace(normed.device)  # the chunk's buffers, reused by every chunk
        if plan.logit_rows:
            for start in range(0, num_tokens, chunk):
                stop = min(start + chunk, num_tokens)
                out = _chunk(
                    normed[:, start:stop].float(),
                    None if weights is None else weights[start:stop].float(),
                    labels[start:stop],
                    weight,
                    bias,
                    plan,
                    logit_fn,
                    need_grad,
                    ws,
                )
                sums += out[0]
                if need_grad:
                    grad_normed[:, start:stop] = out[1]
                    if grad_weights is not None and out[2] is not None:
                        grad_weights[start:stop] = out[2]
        del ws
        ctx.grads = (grad_normed, grad_weights)
        ctx.dtypes = (normed.dtype, None if weights is None else weights.dtype)
        total, ce_ens, ce_layers, distill = (value.clone() for value in sums)
        ctx.mark_non_differentiable(ce_ens, ce_layers, distill)
        return total, ce_ens, ce_layers, distill

    @staticmethod
    def backward(ctx, grad_total, *_parts):
        grad_normed, grad_weights = ctx.grads
        if grad_normed is None:
            raise RuntimeError("chunked_mode_loss ran without gradients (no_grad or no inputs)")
        ctx.grads = (None, None)  # free them with the graph; stored for one backward only
        # Scaled in place: no second input-sized copy at the backward's peak.
        out_normed = grad_normed.mul_(grad_total).to(ctx.dtypes[0])
        out_weights = None
        if grad_weights is not None:
            out_weights = grad_weights.mul_(grad_total).to(ctx.dtypes[1])
        return out_normed, out_weights, None, None, None, None, None, None, None


def _softcapped(raw: torch.Tensor, logit_fn: LogitFn | None, need_grad: bool):
    """`logit_fn(raw)` and a function mapping dL/dz back to dL/draw (identity without one)."""
    if logit_fn is None:
        return raw, lambda g: g
    if not need_grad:
        return logit_fn(raw), None
    with torch.enable_grad():
        # A copy: the block row under `raw` is overwritten later, and logit_fn may save its input.
        leaf = raw.detach().clone().requires_grad_(True)
        z = logit_fn(leaf)
    return z.detach(), lambda g: torch.autograd.grad(z, leaf, g)[0]


class _Workspace:
    """Named fp32 buffers allocated once per call and reused by every chunk.

    Each chunk needs the same few `[c, V]` buffers; allocating them afresh costs more than the
    elementwise passes that fill them (large CPU allocations are fresh pages, faulted in on first
    touch). A smaller last chunk gets a contiguous prefix of each buffer.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.flat: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, *shape: int) -> torch.Tensor:
        size = 1
        for dim in shape:
            size *= dim
        buf = self.flat.get(name)
        if buf is None or buf.numel() < size:
            buf = self.flat[name] = torch.empty(size, device=self.device)
        return buf[:size].view(shape)


@dataclass
class _Teacher:
    """softmax(teacher / T) of one chunk, computed once and shared by every student."""

    p: torch.Tensor  # [c, V]
    neg_entropy: torch.Tensor  # [c]: sum_v p log p
    scaled: torch.Tensor | None  # -lambda T p, the teacher's share of each student's gradient


def _row_loss(
    z: torch.Tensor,
    labels: torch.Tensor,
    ce_weight: float,
    teacher: _Teacher | None,
    plan: TermPlan,
    need_grad: bool,
    ws: _Workspace,
    scratch: str = "row",
    out: torch.Tensor | None = None,
    ens: tuple[torch.Tensor, torch.Tensor] | None = None,
):
    """CE and KL sums of one fp32 logits row `z` `[c, V]` and, if wanted, dLoss/dz.

    `teacher` is given for a student row. The gradient goes to `out` (a row of the chunk's block,
    which may alias `z`: every read of `z` comes first), else to the `scratch` buffer. `ens` =
    (dL/dz_ens, w_l) adds the ensemble's share `w_l dL/dz_ens` (the ensemble is mixed from this
    row's logits). The per-layer CE and the KL share one log-softmax and one exp when T = 1; each
    step below is one pass over the row.
    """
    temperature = plan.temperature
    kd_t = plan.distill * temperature
    shape = z.shape
    ce = kl = z.new_zeros(())
    logp = logq = None
    if ce_weight > 0 or (teacher is not None and temperature == 1.0):
        logp = torch.log_softmax(z, dim=-1, out=ws(scratch, *shape))
    if ce_weight > 0:
        ce = -logp.gather(-1, labels[:, None]).sum()
    if teacher is not None:
        logq = logp
        if temperature != 1.0:
            scaled_z = torch.div(z, temperature, out=ws("scaled_z", *shape))
            logq = torch.log_softmax(scaled_z, dim=-1, out=ws("logq", *shape))
        # KL(p_t || q) = sum p_t log p_t - sum p_t log q; the first sum is shared by students.
        cross = torch.einsum("cv,cv->c", teacher.p, logq)
        kl = temperature**2 * (teacher.neg_entropy - cross).sum()
    if not need_grad:
        return ce, kl, None

    def into() -> dict:
        # The gradient's own buffer, taken only by the branches that need one (the ensemble's
        # row keeps its gradient in its scratch: an unused [c, V] buffer otherwise).
        return {"out": out if out is not None else ws(scratch + "_grad", *shape)}

    # d CE / dz = a (p - onehot(y)); d lambda T^2 KL / dz = lambda T (q - p_t). The logs are not
    # needed any more: exponentiate them in place.
    grad = None
    if teacher is not None and logq is not logp:  # T != 1: q and p are different softmaxes
        grad = torch.add(teacher.scaled, logq.exp_(), alpha=kd_t, **into())
    if logp is not None:
        shared = teacher is not None and logq is logp  # T = 1: q is p
        p = logp.exp_()
        if grad is not None:
            grad.add_(p, alpha=ce_weight)
        elif shared:
            grad = torch.add(teacher.scaled, p, alpha=ce_weight + kd_t, **into())
        elif out is not None:
            grad = torch.mul(p, ce_weight, **into())
        else:  # the gradient stays in the scratch buffer
            grad = p.mul_(ce_weight) if ce_weight != 1.0 else p
        if ce_weight > 0:
            grad.scatter_add_(-1, labels[:, None], grad.new_full((labels.numel(), 1), -ce_weight))
    if ens is not None:
        grad = torch.mul(*ens, **into()) if grad is None else grad.addcmul_(*ens)
    return ce, kl, grad


def _chunk(x, w, labels, weight, bias, plan: TermPlan, logit_fn, need_grad, ws: _Workspace):
    """One chunk: loss sums `[4]` and, if wanted, the gradients for `x` `[|S|, c, H]` and `w`.

    One `[|S|, c, V]` block holds the raw per-layer logits, then each row is overwritten in place by
    its gradient; the other buffers are a few `[c, V]` rows (`_Workspace`).
    """
    num_selected, c, hidden = x.shape
    vocab = weight.shape[0]
    temperature = plan.temperature
    zero = x.new_zeros(())
    ce_ens, ce_layers, distill = zero, zero, zero
    grad_x = grad_w = None

    def head(states: torch.Tensor) -> torch.Tensor:
        """fp32 logits `[n, c, V]` of states `[n, c, H]`, written into the chunk's block."""
        n = states.shape[0]
        block = ws("block", n, c, vocab)
        states = states.reshape(n * c, hidden)
        if weight.dtype == torch.float32:
            if bias is None:
                torch.matmul(states, weight.t(), out=block.view(n * c, vocab))
            else:
                torch.addmm(bias, states, weight.t(), out=block.view(n * c, vocab))
        else:  # a lower-precision head computes in its dtype, as `mode_loss` does
            block.view(n * c, vocab).copy_(F.linear(states.to(weight.dtype), weight, bias))
        return block

    def back(grad_logits: torch.Tensor) -> torch.Tensor:
        return torch.matmul(grad_logits.to(weight.dtype), weight).float()

    def teacher_of(z_teacher: torch.Tensor) -> _Teacher:
        if temperature != 1.0:
            z_teacher = torch.div(z_teacher, temperature, out=ws("scaled_z", c, vocab))
        logp_t = torch.log_softmax(z_teacher, dim=-1, out=ws("teacher_logp", c, vocab))
        p_t = torch.exp(logp_t, out=ws("teacher_p", c, vocab))
        neg_entropy = torch.einsum("cv,cv->c", p_t, logp_t)
        scaled = None
        if need_grad:
            scaled = torch.mul(p_t, -plan.distill * temperature, out=logp_t)
        return _Teacher(p_t, neg_entropy, scaled)

    if not plan.layer_logits:
        # Ensemble only: one head matmul on the mixed states; its gradient goes back through the
        # mix: dL/dx_l = w_l dL/dm, dL/dw_l = <dL/dm, x_l>.
        mixed = torch.einsum("sch,cs->ch", x, w)
        raw = head(mixed[None])[0]
        z, to_raw = _softcapped(raw, logit_fn, need_grad)
        # The gradient overwrites the block's row (z itself without a logit_fn): one fewer row.
        ce_ens, _, grad_z = _row_loss(z, labels, plan.a_ens, None, plan, need_grad, ws, out=raw)
        del z
        if need_grad:
            grad_m = back(to_raw(grad_z))
            grad_x = w.t()[:, :, None] * grad_m
            grad_w = torch.einsum("sch,ch->cs", x, grad_m)
        total = plan.a_ens * ce_ens
        return torch.stack([total, ce_ens, ce_layers, distill]), grad_x, grad_w

    raw = head(x)  # [|S|, c, V]: the chunk's block
    teacher = None
    grad_ens = None
    if plan.ensemble_logits:
        # The ensemble's raw logits mixed from the per-layer ones: W.(sum w_l x_l) + b equals
        # sum w_l (W x_l + b) + (1 - sum w_l) b, and saves the ensemble's head matmul (forward and
        # backward: its gradient folds into the layers' rows as w_l dL/dz).
        raw_ens = torch.mul(raw[0], w[:, :1], out=ws("row", c, vocab))
        for s in range(1, num_selected):
            raw_ens.addcmul_(raw[s], w[:, s : s + 1])
        if bias is not None:
            raw_ens.addcmul_((1 - w.sum(-1, keepdim=True)), bias.float()[None])
        z_ens, ens_to_raw = _softcapped(raw_ens, logit_fn, need_grad)
        if plan.teacher_is_ensemble and plan.students:
            teacher = teacher_of(z_ens)
        ce_ens, _, grad_z = _row_loss(z_ens, labels, plan.a_ens, None, plan, need_grad, ws, "ens")
        del z_ens, raw_ens
        if need_grad and grad_z is not None:
            grad_ens = ens_to_raw(grad_z)
            # dL/dw_l = <dL/draw_ens, raw_l - b>
            grad_w = torch.stack(
                [torch.einsum("cv,cv->c", grad_ens, raw[s]) for s in range(num_selected)], dim=-1
            )
            if bias is not None:
                grad_w -= (grad_ens @ bias.float())[:, None]
        elif need_grad:
            grad_w = w.new_zeros(c, num_selected)

    zs = [None] * num_selected
    to_raws = [None] * num_selected
    if plan.students and not plan.teacher_is_ensemble:
        zs[-1], to_raws[-1] = _softcapped(raw[-1], logit_fn, need_grad)
        teacher = teacher_of(zs[-1])

    has_grad = [False] * num_selected
    for s in range(num_selected):
        a_l = plan.a_layers[s]
        student = s < plan.students
        if a_l == 0 and not student and grad_ens is None:
            continue  # e.g. the final-layer teacher: its row enters no term with a gradient
        if zs[s] is None:
            zs[s], to_raws[s] = _softcapped(raw[s], logit_fn, need_grad)
        ens = None if grad_ens is None else (grad_ens, w[:, s : s + 1])
        row_teacher = teacher if student else None
        if logit_fn is None:  # the gradient goes straight into the block's row
            ce, kl, _ = _row_loss(
                zs[s], labels, a_l, row_teacher, plan, need_grad, ws, out=raw[s], ens=ens
            )
        else:  # chain rule through logit_fn first, then the ensemble's share (it is on raw)
            ce, kl, grad_z = _row_loss(zs[s], labels, a_l, row_teacher, plan, need_grad, ws)
            if need_grad:
                grad_raw = to_raws[s](grad_z) if grad_z is not None else torch.zeros_like(raw[s])
                raw[s] = grad_raw if ens is None else grad_raw.addcmul_(*ens)
        zs[s] = None
        ce_layers = ce_layers + a_l * ce
        distill = distill + kl
        has_grad[s] = True

    if need_grad:
        grad_x = torch.zeros_like(x)
        rows = [s for s in range(num_selected) if has_grad[s]]
        if rows and rows == list(range(rows[0], rows[-1] + 1)):  # a slice: no copy of the block
            grad_x[rows[0] : rows[-1] + 1] = back(raw[rows[0] : rows[-1] + 1])
        elif rows:
            grad_x[rows] = back(raw[rows])
    total = plan.a_ens * ce_ens + ce_layers + plan.distill * distill
    return torch.stack([total, ce_ens, ce_layers, distill]), grad_x, grad_w
