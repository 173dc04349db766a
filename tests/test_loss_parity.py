"""The chunked MoDE loss against the naive reference `mode_loss` (itself judged by the per-token
formula in test_head_loss.py): loss, parts and every gradient, for each loss recipe, several chunk
sizes, bf16 inputs and gradient accumulation over uneven micro-batches."""

from __future__ import annotations

import pytest
import torch
from helpers import RMSNorm
from torch import nn

from mode_cli.mode.chunked import chunk_size, chunked_mode_loss
from mode_cli.mode.head import MoDEHead
from mode_cli.mode.loss import final_only_loss, mode_loss
from mode_cli.mode.selection import last_k
from mode_cli.mode.terms import FINAL_ONLY, LossWeights

HIDDEN, VOCAB, N, TOKENS = 16, 37, 5, 13


def softcap(z: torch.Tensor) -> torch.Tensor:
    """Gemma 2's final-logit soft-capping, with a cap low enough to matter here."""
    return 2.0 * torch.tanh(z / 2.0)


# name: (weights, router, logit_fn, head bias); router "none" means weights=None (no ensemble).
RECIPES = {
    "mode": (LossWeights(), "token", None, True),
    "mode-nobias": (LossWeights(), "token", None, False),
    "mode-nodistill": (LossWeights(distill=0.0), "token", None, True),
    "final-only": (FINAL_ONLY, "final-only", None, True),
    "layerwise": (
        LossWeights(ensemble=0.0, layers=(0.2, 0.3, 0.5), distill=0.0),
        "none",
        None,
        True,
    ),
    "layerwise-distill": (LossWeights(ensemble=0.0, layers=(0.0, 0.3, 0.5)), "none", None, False),
    "ensemble-teacher": (LossWeights(teacher="ensemble"), "token", None, True),
    "all-terms-T2": (
        LossWeights(ensemble=0.5, layers=(0.3, 0.2, 0.4), distill=0.7, temperature=2.0),
        "token",
        None,
        True,
    ),
    "softcap": (LossWeights(layers=(0.1, 0.0, 0.5), distill=0.3), "token", softcap, True),
    "softcap-ensemble-teacher-T2": (
        LossWeights(teacher="ensemble", distill=0.5, temperature=2.0),
        "token",
        softcap,
        False,
    ),
}


class Upstream(nn.Module):
    """What feeds the loss in training: a trainable adapter on the decoder states (LoRA's stand-in),
    then the MoDE head's trainable norms and router (or the frozen final norm alone)."""

    def __init__(self, router: str) -> None:
        super().__init__()
        self.adapter = nn.Linear(HIDDEN, HIDDEN)
        self.final_norm = RMSNorm(HIDDEN).requires_grad_(False)
        self.head = None
        if router != "final-only":
            self.head = MoDEHead(self.final_norm, last_k(N, 3), N, HIDDEN, router=router)
            with torch.no_grad():  # away from the initial state, so every term matters
                for norm in self.head.norms.values():
                    norm.weight.add_(0.2 * torch.randn_like(norm.weight))
                if self.head.router is not None:
                    self.head.router.weight.normal_(0, 0.3)

    def forward(self, raw: dict[int, torch.Tensor]):
        states = {layer: h + self.adapter(h) for layer, h in raw.items()}
        states[N] = self.final_norm(states[N])
        if self.head is None:
            return states[N][None], None
        return self.head(states)


def make_case(name: str, seed: int = 0, tokens: int = TOKENS):
    torch.manual_seed(seed)
    weights, router, logit_fn, bias = RECIPES[name]
    upstream = Upstream(router)
    lm_head = nn.Linear(HIDDEN, VOCAB, bias=bias).requires_grad_(False)
    if bias:
        nn.init.normal_(lm_head.bias, 0, 0.5)
    layers = [N] if router == "final-only" else last_k(N, 3)
    raw = {layer: torch.randn(tokens, HIDDEN) for layer in layers}
    labels = torch.randint(0, VOCAB, (tokens,))
    return upstream, lm_head, raw, labels, weights, logit_fn


def run(loss_fn, upstream, lm_head, raw, labels, weights, logit_fn, **kwargs):
    """Loss sums and the gradients of the inputs, the loss's inputs and every upstream weight."""
    upstream.zero_grad()
    raw = {layer: h.clone().requires_grad_(True) for layer, h in raw.items()}
    normed, routing = upstream(raw)
    normed.retain_grad()
    if routing is not None:
        routing.retain_grad()
    sums = loss_fn(normed, routing, labels, lm_head, weights, logit_fn=logit_fn, **kwargs)
    sums.total.backward()
    grads = {f"raw{layer}": h.grad for layer, h in raw.items()}
    grads["normed"] = normed.grad
    if routing is not None:
        grads["weights"] = routing.grad
    for name, param in upstream.named_parameters():
        if param.requires_grad:
            grads[name] = param.grad.clone()
    return sums, grads


def assert_same(ours, ref, rtol=1e-5, atol=1e-6):
    (sums, grads), (ref_sums, ref_grads) = ours, ref
    assert sums.tokens == ref_sums.tokens
    torch.testing.assert_close(sums.total, ref_sums.total, rtol=rtol, atol=atol)
    assert sums.parts.keys() == ref_sums.parts.keys()
    for key, value in sums.parts.items():
        assert value == pytest.approx(ref_sums.parts[key], rel=rtol, abs=atol), key
    assert grads.keys() == ref_grads.keys()
    for key, grad in grads.items():
        assert grad is not None and ref_grads[key] is not None, key
        torch.testing.assert_close(grad, ref_grads[key], rtol=rtol, atol=atol, msg=key)


def budget_for(chunk: int, weights: LossWeights, router: str) -> int:
    """A chunk budget giving `chunk` tokens per chunk for this recipe."""
    num_selected = 1 if router == "final-only" else 3
    rows = chunk_size(weights, num_selected, 1, router in ("token",), chunk_budget=1 << 30)
    rows = (1 << 30) // rows  # logits rows per token
    budget = chunk * rows * VOCAB
    assert chunk_size(weights, num_selected, VOCAB, router == "token", budget) == chunk
    return budget


@pytest.mark.parametrize("chunk", [1, 5, 13, 64], ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("name", list(RECIPES))
def test_chunked_equals_naive(name, chunk):
    case = make_case(name)
    weights, router = RECIPES[name][0], RECIPES[name][1]
    ref = run(mode_loss, *case)
    ours = run(chunked_mode_loss, *case, chunk_budget=budget_for(chunk, weights, router))
    assert_same(ours, ref)
    if weights.distill > 0 and (weights.ensemble > 0 or weights.teacher == "final"):
        assert ours[0].parts["distill"] > 0  # the case exercises the term it claims to


@pytest.mark.parametrize("name", ["mode", "final-only", "all-terms-T2", "softcap"])
def test_chunked_equals_naive_in_bf16(name):
    """bf16 states, routing weights and head: both compute in fp32 after the bf16 head matmul."""
    torch.manual_seed(3)
    weights, router, logit_fn, bias = RECIPES[name]
    num_selected = 1 if router == "final-only" else 3
    lm_head = nn.Linear(HIDDEN, VOCAB, bias=bias).to(torch.bfloat16).requires_grad_(False)
    normed = torch.randn(num_selected, TOKENS, HIDDEN).to(torch.bfloat16)
    routing = None
    if router == "token":
        routing = torch.softmax(torch.randn(TOKENS, num_selected), -1).to(torch.bfloat16)
    labels = torch.randint(0, VOCAB, (TOKENS,))
    results = []
    for loss_fn, kwargs in [(mode_loss, {}), (chunked_mode_loss, {"chunk_budget": 4 * VOCAB})]:
        inputs = [t.clone().requires_grad_(True) for t in (normed, routing) if t is not None]
        sums = loss_fn(
            inputs[0], inputs[1] if routing is not None else None, labels, lm_head, weights,
            logit_fn=logit_fn, **kwargs,
        )  # fmt: skip
        sums.total.backward()
        assert all(t.grad.dtype == torch.bfloat16 for t in inputs)
        results.append((sums, {str(i): t.grad for i, t in enumerate(inputs)}))
    # bf16 rounding of the logits (the chunked loss mixes the ensemble from bf16 layer logits).
    assert_same(results[1], results[0], rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("name", ["mode", "final-only", "layerwise", "all-terms-T2"])
def test_gradient_accumulation_over_uneven_micro_batches(name):
    """Micro-batches of 5, 1 and 9 tokens, each sum divided by the step's 15 tokens, accumulate to
    the gradient of one call on all 15 tokens (chunked and naive alike)."""
    upstream, lm_head, raw, labels, weights, logit_fn = make_case(name, seed=1, tokens=15)
    budget = budget_for(4, weights, RECIPES[name][1])

    def accumulated(loss_fn, splits):
        upstream.zero_grad()
        start, parts = 0, {}
        for size in splits:
            micro = {layer: h[start : start + size] for layer, h in raw.items()}
            normed, routing = upstream(micro)
            sums = loss_fn(
                normed, routing, labels[start : start + size], lm_head, weights,
                logit_fn=logit_fn, **({"chunk_budget": budget} if loss_fn is chunked_mode_loss else {}),
            )  # fmt: skip
            (sums.total / 15).backward()
            for key, value in sums.parts.items():
                parts[key] = parts.get(key, 0.0) + value
            start += size
        grads = {n: p.grad.clone() for n, p in upstream.named_parameters() if p.requires_grad}
        return parts, grads

    one_parts, one_grads = accumulated(chunked_mode_loss, [15])
    for loss_fn in (chunked_mode_loss, mode_loss):
        parts, grads = accumulated(loss_fn, [5, 1, 9])
        assert parts == pytest.approx(one_parts, rel=1e-5)
        for key, grad in grads.items():
            torch.testing.assert_close(grad, one_grads[key], rtol=1e-5, atol=1e-6, msg=key)


def test_final_only_loss_is_the_general_loss_with_one_layer():
    upstream, lm_head, raw, labels, _, _ = make_case("final-only")
    final = raw[N]
    sums = final_only_loss(final, labels, lm_head, chunk_budget=3 * VOCAB)
    ref = mode_loss(final[None], None, labels, lm_head, FINAL_ONLY)
    torch.testing.assert_close(sums.total, ref.total, rtol=1e-6, atol=1e-6)
    assert sums.parts == pytest.approx({"ce_final": ref.parts["ce_layers"]})


def test_no_grad_and_frozen_inputs_give_the_same_loss():
    upstream, lm_head, raw, labels, weights, _ = make_case("all-terms-T2")
    normed, routing = upstream(raw)
    with torch.no_grad():
        eval_sums = chunked_mode_loss(normed, routing, labels, lm_head, weights, chunk_budget=500)
    train_sums = chunked_mode_loss(normed, routing, labels, lm_head, weights, chunk_budget=500)
    assert not eval_sums.total.requires_grad and train_sums.total.requires_grad
    torch.testing.assert_close(eval_sums.total, train_sums.total)
    assert eval_sums.parts == train_sums.parts


@pytest.mark.parametrize("loss_fn", [mode_loss, chunked_mode_loss])
def test_without_a_router_the_ensemble_terms_are_refused(loss_fn):
    _, lm_head, raw, labels, _, _ = make_case("layerwise")
    normed = torch.stack([raw[layer] for layer in sorted(raw)])
    for weights in [LossWeights(), LossWeights(ensemble=0.0, teacher="ensemble")]:
        with pytest.raises(ValueError, match="no ensemble"):
            loss_fn(normed, None, labels, lm_head, weights)
    with pytest.raises(ValueError, match="per-layer weights"):
        loss_fn(normed, None, labels, lm_head, LossWeights(ensemble=0.0, layers=(1.0, 1.0)))


def test_the_teacher_gets_no_gradient_and_per_layer_logits_are_skipped_when_unweighted():
    """Distillation alone leaves the final layer's state untouched; ensemble-only MoDE never
    runs a per-layer head matmul (the chunk then holds one logits row, not |S|+1)."""
    _, lm_head, raw, labels, _, _ = make_case("mode")
    normed = torch.stack([raw[layer] for layer in sorted(raw)]).requires_grad_(True)
    routing = torch.full((TOKENS, 3), 1 / 3)
    weights = LossWeights(ensemble=0.0, distill=1.0)
    chunked_mode_loss(normed, routing, labels, lm_head, weights, chunk_budget=100).total.backward()
    assert normed.grad[-1].abs().max() == 0 and normed.grad[0].abs().max() > 0
    assert chunk_size(LossWeights(distill=0.0), 3, VOCAB, chunk_budget=10 * VOCAB) == 10
    assert chunk_size(LossWeights(), 3, VOCAB, chunk_budget=10 * VOCAB) == 2


def test_routing_weights_that_do_not_sum_to_one():
    """The ensemble is W.(sum w_l x_l) + b even when the weights are not a softmax."""
    _, lm_head, raw, labels, _, _ = make_case("mode")
    normed = torch.stack([raw[layer] for layer in sorted(raw)])
    routing = torch.rand(TOKENS, 3) * 2
    results = []
    for loss_fn, kwargs in [(mode_loss, {}), (chunked_mode_loss, {"chunk_budget": 20 * VOCAB})]:
        inputs = [normed.clone().requires_grad_(True), routing.clone().requires_grad_(True)]
        sums = loss_fn(*inputs, labels, lm_head, LossWeights(temperature=2.0), **kwargs)
        sums.total.backward()
        results.append((sums, {"normed": inputs[0].grad, "weights": inputs[1].grad}))
    assert_same(results[1], results[0])


# ---------------------------------------------------------------------------- under autocast

# bf16 keeps 8 significant bits: rounding to nearest moves a value by at most 2^-8 of itself
# (half its machine epsilon, 2^-7).
BF16_ROUNDING = torch.finfo(torch.bfloat16).eps / 2


def loss_inputs(name: str, dtype: torch.dtype = torch.float32):
    """A recipe's loss inputs as leaves (normed states, routing weights or None), in `dtype`,
    with its head (fp32, as peft's kbit preparation leaves it), labels, weights and logit_fn."""
    upstream, lm_head, raw, labels, weights, logit_fn = make_case(name)
    with torch.no_grad():
        normed, routing = upstream(raw)
    inputs = [t.to(dtype).requires_grad_(True) for t in (normed, routing) if t is not None]
    return inputs, lm_head, labels, weights, logit_fn


def loss_alone(loss_fn, inputs, lm_head, labels, weights, logit_fn, autocast: bool, **kwargs):
    """Loss sums and the gradients of the loss's own inputs, optionally under bf16 autocast."""
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    routing = inputs[1] if len(inputs) > 1 else None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        sums = loss_fn(inputs[0], routing, labels, lm_head, weights, logit_fn=logit_fn, **kwargs)
    sums.total.backward()
    return sums, {str(i): t.grad for i, t in enumerate(inputs)}


@pytest.mark.parametrize("loss_fn", [chunked_mode_loss, mode_loss], ids=["chunked", "naive"])
@pytest.mark.parametrize("name", list(RECIPES))
def test_the_loss_computes_in_fp32_under_the_callers_bf16_autocast(name, loss_fn):
    """train.precision=bf16 runs the step under bf16 autocast; the loss turns it off inside, so on
    the same inputs it equals the fp32 reference run without autocast, at the fp32 tolerance of
    the parity tests above (every term, the KL's entropy and cross sums, the input-gradient
    matmul and the router gradient)."""
    inputs, lm_head, labels, weights, logit_fn = loss_inputs(name)
    ref = loss_alone(mode_loss, inputs, lm_head, labels, weights, logit_fn, autocast=False)
    kwargs = {"chunk_budget": 5 * VOCAB} if loss_fn is chunked_mode_loss else {}
    ours = loss_alone(loss_fn, inputs, lm_head, labels, weights, logit_fn, autocast=True, **kwargs)
    assert_same(ours, ref)
    assert all(grad.dtype == torch.float32 for grad in ours[1].values())


@pytest.mark.parametrize("name", ["mode", "mode-nodistill", "final-only", "layerwise", "softcap"])
def test_bf16_inputs_under_autocast_stay_within_their_rounding_of_fp32(name):
    """What a bf16 step feeds the loss: states and routing weights rounded to bf16. The loss under
    autocast on them differs from the fp32 reference on the unrounded inputs by no more than the
    rounding itself can explain: each input x moves by at most u|x| (u = 2^-8), so to first order
    |dL| <= u * sum |dL/dx * x| over every input; twice that bounds the second-order rest.
    And on the rounded inputs themselves it is the fp32 reference to fp32 tolerance."""
    inputs, lm_head, labels, weights, logit_fn = loss_inputs(name)
    ref_sums, ref_grads = loss_alone(
        mode_loss, inputs, lm_head, labels, weights, logit_fn, autocast=False
    )
    rounded = [t.detach().to(torch.bfloat16) for t in inputs]
    ours = loss_alone(
        chunked_mode_loss, rounded, lm_head, labels, weights, logit_fn, autocast=True,
        chunk_budget=5 * VOCAB,
    )  # fmt: skip
    first_order = sum(
        (ref_grads[str(i)] * t.detach()).abs().sum() for i, t in enumerate(inputs)
    ).item()
    tolerance = 2 * BF16_ROUNDING * first_order
    assert abs(ours[0].total.item() - ref_sums.total.item()) <= tolerance
    upcast = [t.float() for t in rounded]
    ref_rounded = loss_alone(mode_loss, upcast, lm_head, labels, weights, logit_fn, autocast=False)
    assert ours[0].parts == pytest.approx(ref_rounded[0].parts, rel=1e-5, abs=1e-6)
    torch.testing.assert_close(ours[0].total, ref_rounded[0].total, rtol=1e-5, atol=1e-6)
    for key, grad in ours[1].items():
        assert grad.dtype == torch.bfloat16, key  # gradients come back in the inputs' dtype
        torch.testing.assert_close(
            grad.float(), ref_rounded[1][key], rtol=BF16_ROUNDING, atol=1e-6, msg=key
        )


# ---------------------------------------------------------------------------- chunk sizing


def workspace_elements(monkeypatch, loss_weights: LossWeights, num_selected: int, tokens: int):
    """fp32 elements of the `[c, V]` buffers one chunked call holds (its workspace), forward and
    backward, at a budget far above the batch (the default's regime on a small batch)."""
    from mode_cli.mode import chunked as chunked_mod

    held = []

    class Recorded(chunked_mod._Workspace):
        def __init__(self, device):
            super().__init__(device)
            held.append(self)

    monkeypatch.setattr(chunked_mod, "_Workspace", Recorded)
    torch.manual_seed(0)
    vocab = 500
    lm_head = nn.Linear(HIDDEN, vocab, bias=False).requires_grad_(False)
    normed = torch.randn(num_selected, tokens, HIDDEN, requires_grad=True)
    routing = None
    if loss_weights.ensemble > 0:
        routing = torch.softmax(torch.randn(tokens, num_selected), -1).requires_grad_(True)
    labels = torch.randint(0, vocab, (tokens,))
    sums = chunked_mode_loss(normed, routing, labels, lm_head, loss_weights, chunk_budget=2**26)
    sums.total.backward()
    return sum(buf.numel() for ws in held for buf in ws.flat.values())


def test_a_small_batch_gets_chunks_sized_from_its_tokens(monkeypatch):
    """The budget is a ceiling, not an allocation: on a batch of a few hundred target tokens MoDE
    (3 layers, distillation: a block of 3 rows plus 5 working rows) holds no more logits than the
    plain final-only loss does on the same batch (its one row plus one working row)."""
    tokens = 280
    final = workspace_elements(monkeypatch, FINAL_ONLY, 1, tokens)
    mode = workspace_elements(monkeypatch, LossWeights(), 3, tokens)
    nodistill = workspace_elements(monkeypatch, LossWeights(distill=0.0), 3, tokens)
    assert final == 2 * tokens * 500
    assert mode <= 1.05 * final and nodistill <= 1.05 * final
    # Sizes: a block's rows share the batch's tokens; the budget still caps a large batch.
    assert chunk_size(LossWeights(), 3, 49_152, tokens=280) == 70
    assert chunk_size(FINAL_ONLY, 1, 49_152, has_router=False, tokens=280) == 280
    assert chunk_size(LossWeights(), 3, 128_256, tokens=8192) == 130
    assert chunk_size(LossWeights(), 3, 128_256) == 130
