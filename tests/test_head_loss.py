"""The MoDE head and loss against a naive, token-by-token reference of METHOD.md's formula."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import RMSNorm
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from mode_cli.mode.head import MoDEHead, router_bias
from mode_cli.mode.loss import final_only_loss, mode_loss
from mode_cli.mode.selection import last_k
from mode_cli.mode.terms import LossWeights

torch.manual_seed(0)


def softcap(z: torch.Tensor) -> torch.Tensor:
    return 3.0 * torch.tanh(z / 3.0)


def reference_loss(
    normed_inputs, head, lm_head, labels, w: LossWeights, logit_fn=None
) -> torch.Tensor:
    """METHOD.md 5 written out per token: mixes *logits* (no linear-head shortcut), explicit KL.

    With `logit_fn`, it acts on each layer's logits and on the mix of the raw logits (our choice).
    """
    f = logit_fn or (lambda z: z)
    a_layers = w.layers or (0.0,) * len(head.layers)
    total = torch.zeros(())
    for t in range(labels.numel()):
        states = [normed_inputs[layer][t] for layer in head.layers]
        normed = [
            head.norms[str(layer)](s)
            for layer, s in zip(head.layers[:-1], states[:-1], strict=True)
        ]
        normed.append(states[-1])
        weights = torch.softmax(head.router(normed[-1]), dim=-1)
        raw = [lm_head(u) for u in normed]
        mixed = f(sum(weights[i] * raw[i] for i in range(len(raw))))
        logits = [f(z) for z in raw]
        y = labels[t]
        total = total + w.ensemble * -torch.log_softmax(mixed, -1)[y]
        total = total + sum(
            a * -torch.log_softmax(z, -1)[y] for a, z in zip(a_layers, logits, strict=True)
        )
        if w.teacher == "ensemble":
            teacher, students = torch.softmax(mixed.detach() / w.temperature, -1), logits
        else:
            teacher, students = torch.softmax(logits[-1].detach() / w.temperature, -1), logits[:-1]
        for z in students:
            student = torch.log_softmax(z / w.temperature, -1)
            kl = (teacher * (teacher.log() - student)).sum()
            total = total + w.distill * w.temperature**2 * kl
    return total


def make_head(hidden=16, n=5, k=3, vocab=37):
    final = RMSNorm(hidden)
    head = MoDEHead(final, last_k(n, k), n, hidden, init_final_weight=0.8)
    with torch.no_grad():  # move away from the initial state so every term matters
        for norm in head.norms.values():
            norm.weight.add_(0.2 * torch.randn_like(norm.weight))
        head.router.weight.normal_(0, 0.3)
    lm_head = nn.Linear(hidden, vocab, bias=False)
    return head, lm_head


@pytest.mark.parametrize(
    ("weights", "logit_fn"),
    [
        (LossWeights(), None),
        (LossWeights(distill=0.0), None),
        (LossWeights(ensemble=0.5, layers=(0.3, 0.2, 0.4), distill=0.7, temperature=2.0), None),
        (LossWeights(teacher="ensemble"), None),
        (LossWeights(layers=(0.1, 0.0, 0.5), distill=0.3, temperature=1.5), softcap),
    ],
    ids=["mode", "nodistill", "all-terms-T2", "ensemble-teacher", "softcap"],
)
def test_mode_loss_and_gradients_match_the_naive_formula(weights, logit_fn):
    head, lm_head = make_head()
    tokens, hidden = 11, 16
    raw = {layer: torch.randn(tokens, hidden, requires_grad=True) for layer in head.layers}
    labels = torch.randint(0, 37, (tokens,))

    normed, routing = head(raw)
    ours = mode_loss(normed, routing, labels, lm_head, weights, logit_fn=logit_fn)
    ours.total.backward()
    our_grads = {n: p.grad.clone() for n, p in head.named_parameters()}
    our_input_grads = {layer: x.grad.clone() for layer, x in raw.items()}

    head.zero_grad()
    for x in raw.values():
        x.grad = None
    ref = reference_loss(raw, head, lm_head, labels, weights, logit_fn)
    ref.backward()

    assert ours.tokens == tokens
    torch.testing.assert_close(ours.total, ref, rtol=1e-5, atol=1e-5)
    for name, param in head.named_parameters():
        torch.testing.assert_close(our_grads[name], param.grad, rtol=1e-5, atol=1e-6)
    for layer, x in raw.items():
        torch.testing.assert_close(our_input_grads[layer], x.grad, rtol=1e-5, atol=1e-6)


def test_teacher_is_detached():
    """Distillation alone must not push the final layer's state towards the students."""
    head, lm_head = make_head()
    raw = {layer: torch.randn(7, 16, requires_grad=True) for layer in head.layers}
    labels = torch.randint(0, 37, (7,))
    head.router.weight.requires_grad_(False)
    head.router.bias.requires_grad_(False)
    normed = torch.stack(head.normed(raw))
    routing = torch.full((7, 3), 1 / 3)
    mode_loss(
        normed, routing, labels, lm_head, LossWeights(ensemble=0.0, distill=1.0)
    ).total.backward()
    assert raw[head.layers[-1]].grad is None or raw[head.layers[-1]].grad.abs().max() == 0
    assert raw[head.layers[0]].grad.abs().max() > 0


def test_head_starts_from_the_final_norm_and_the_router_prior():
    final = RMSNorm(8)
    head = MoDEHead(final, [3, 4, 5], 5, 8, init_final_weight=0.9)
    for norm in head.norms.values():
        torch.testing.assert_close(norm.weight, final.weight)
        assert norm.weight.requires_grad and norm.weight is not final.weight
    weights = head.route(torch.randn(3, 4, 8))  # stacked normalised states [|S|, T, H]
    torch.testing.assert_close(weights, torch.tensor([[0.05, 0.05, 0.9]]).expand(4, 3))
    assert sorted(head.norms) == ["3", "4"]
    assert not any(p is final.weight for p in head.parameters())
    assert head.describe()["trainable_parameters"] == 2 * 8 + 8 * 3 + 3


def test_train_final_norm_gives_layer_n_a_trainable_copy_of_the_final_norm():
    """Off (the default), layer N reads through the model's frozen final norm (its state arrives
    normalised); on, through a trainable copy initialised from it (its state arrives before the
    norm), which starts out identical, learns, is saved, and comes back from the description."""
    final = RMSNorm(8).requires_grad_(False)
    raw = {layer: torch.randn(4, 8) for layer in (3, 4, 5)}
    frozen = MoDEHead(final, [3, 4, 5], 5, 8)
    head = MoDEHead(final, [3, 4, 5], 5, 8, train_final_norm=True)
    assert sorted(head.norms) == ["3", "4", "5"] and sorted(frozen.norms) == ["3", "4"]
    assert head.norms["5"].weight is not final.weight and head.norms["5"].weight.requires_grad
    normed, _ = head(raw)
    expected, _ = frozen({**raw, 5: final(raw[5])})
    torch.testing.assert_close(normed, expected)
    assert head.describe()["trainable_parameters"] == frozen.describe()["trainable_parameters"] + 8

    normed[-1].sum().backward()
    assert head.norms["5"].weight.grad.abs().max() > 0 and final.weight.grad is None
    with torch.no_grad():
        head.norms["5"].weight.mul_(2.0)
    info = head.describe()
    assert info["train_final_norm"] is True and frozen.describe()["train_final_norm"] is False
    rebuilt = MoDEHead.from_description(final, info)
    rebuilt.load_state_dict(head.state_dict())
    torch.testing.assert_close(rebuilt(raw)[0], head(raw)[0])
    assert (head(raw)[0][-1] - expected[-1]).abs().max() > 0.1  # layer N's norm is the trained one
    older = {k: v for k, v in frozen.describe().items() if k != "train_final_norm"}
    assert MoDEHead.from_description(final, older).train_final_norm is False


def test_router_bias_and_last_k():
    assert torch.softmax(router_bias(4, 0.7), 0).tolist() == pytest.approx([0.1, 0.1, 0.1, 0.7])
    assert router_bias(1, 0.9).tolist() == [0.0]
    assert last_k(30, 3) == [28, 29, 30]
    with pytest.raises(ValueError, match="30 layers"):
        last_k(30, 31)
    with pytest.raises(ValueError):
        MoDEHead(RMSNorm(4), [2, 3], 5, 4)  # must end with layer N


def test_final_only_equals_the_models_own_causal_lm_loss():
    torch.manual_seed(1)
    config = LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 50, (2, 9))
    labels = ids.clone()
    labels[0, :4] = -100
    labels[1, 7:] = -100
    expected = model(input_ids=ids, labels=labels).loss

    states = model.model(input_ids=ids, output_hidden_states=True).hidden_states
    targets = labels[:, 1:]
    keep = targets != -100
    sums = final_only_loss(states[-1][:, :-1][keep], targets[keep], model.lm_head)
    torch.testing.assert_close(sums.total / sums.tokens, expected, rtol=1e-6, atol=1e-6)


def test_untrained_ensemble_is_close_to_the_base_prediction():
    """With the 0.9 prior and norms copied from the final norm, step 0 loses little."""
    head, lm_head = make_head()
    head.reset_router()
    raw = {layer: torch.randn(20, 16) for layer in head.layers}
    labels = torch.randint(0, 37, (20,))
    normed, routing = head(raw)
    ensemble = mode_loss(normed, routing, labels, lm_head, LossWeights(distill=0.0)).total / 20
    final = final_only_loss(normed[-1], labels, lm_head).total / 20
    assert math.isfinite(ensemble.item())
    assert torch.allclose(routing[:, -1], torch.tensor(0.8))
    assert abs(ensemble.item() - final.item()) < 0.5 * final.item()


def test_after_the_loss_forward_the_graph_holds_no_stacked_copy_of_the_states():
    """The stacked `[|S|, T, H]` states feed the loss and nothing else keeps them: the router
    reads the separate states, and the chunked loss keeps only its input gradients."""
    import gc
    import weakref

    from mode_cli.mode.chunked import chunked_mode_loss

    for router_input in ("final", "mean"):
        head, lm_head = make_head()
        head = MoDEHead(RMSNorm(16), head.layers, head.num_layers, 16, router_input=router_input)
        raw = {layer: torch.randn(20, 16, requires_grad=True) for layer in head.layers}
        normed, routing = head(raw)
        labels = torch.randint(0, 37, (20,))
        sums = chunked_mode_loss(normed, routing, labels, lm_head, LossWeights())
        stacked = weakref.ref(normed)
        del normed
        gc.collect()
        assert stacked() is None, router_input
        sums.total.backward()
        assert all(raw[layer].grad.abs().max() > 0 for layer in head.layers[:-1])
