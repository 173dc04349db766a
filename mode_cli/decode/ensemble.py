"""The MoDE head on a transformers model: its forward and `generate()` decode from the ensemble.

The ensemble's logits are `f(W . sum_l w_l Norm_l(h_l))`, and `W` is the model's own LM head. So
the model decodes from the ensemble when its LM head is replaced by a module that mixes first:

    attach(model, head)                       # forward hooks on the selected layers + EnsembleHead
    model.generate(**inputs)                  # every step decodes from the ensemble
    with use_head(model, "final"): ...        # the model's own final layer, same object

During each forward of the CausalLM, hooks on the selected decoder layers keep their outputs (for
the positions of that call only, so the KV cache works unchanged); the `EnsembleHead` in place of
the LM head receives the final-normed state of layer N, applies the trained norms to the kept
states, routes, mixes, and projects once with the original head. What the model does after its
head (Gemma 2's soft-capping) then acts on the mixed logits, as in training. Outside a forward of
the whole model (the decoder alone, or the head called directly, as the per-layer report does),
the replaced head is the plain LM head. `docs/method.md`, "Choices the paper leaves open"
(decoding with the ensemble).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from mode_cli.errors import ModeError
from mode_cli.mode.head import MoDEHead, has_ensemble
from mode_cli.mode.methods import HEAD_KINDS, METHODS, method_of
from mode_cli.models import families


class EnsembleHead(nn.Module):
    """Stands in for a model's LM head: the MoDE ensemble during a model forward, else the head.

    Args:
        lm_head: the model's original output projection (kept, and used for every projection).
        head: the trained MoDE head (norms and router).
        kind: `ensemble` or `final` (the original head's prediction from layer N alone).
    """

    def __init__(self, lm_head: nn.Module, head: MoDEHead, kind: str = "ensemble") -> None:
        super().__init__()
        self.lm_head = lm_head
        self.head = head
        self.kind = kind
        self.captured: dict[int, torch.Tensor] = {}
        self.in_forward = False
        self.logits_to_keep: int | torch.Tensor = 0
        self.hooks: list = []
        self.original_forward = None  # the instance's own `forward` attribute before attach

    @property
    def mixing(self) -> bool:
        return self.in_forward and self.kind == "ensemble"

    def forward(self, final_state: torch.Tensor) -> torch.Tensor:
        if not self.mixing:
            return self.lm_head(final_state)
        from transformers.modeling_utils import slice_logits_to_keep

        # The model sliced its last state to the positions it wants logits for; slice the
        # captured states the same way so every layer lines up token by token.
        states = {
            layer: slice_logits_to_keep(self.captured.pop(layer), self.logits_to_keep)
            for layer in captured_layers(self.head)
        }
        if not self.head.train_final_norm:
            states[self.head.num_layers] = final_state
        normed, weights = self.head(states)
        mixed = MoDEHead.mix(normed, weights)
        return self.lm_head(mixed.to(self.lm_head.weight.dtype))


def captured_layers(head: MoDEHead) -> list[int]:
    """The layers whose outputs the hooks keep: those below N, and N itself when the head has its
    own norm for it (the LM head only sees N's state after the model's final norm)."""
    return head.layers if head.train_final_norm else head.layers[:-1]


def ensemble_of(model: nn.Module) -> EnsembleHead | None:
    """The EnsembleHead attached to `model`, or None."""
    head = families.lm_head(model)
    return head if isinstance(head, EnsembleHead) else None


def check_head_kind(kind: str, head: MoDEHead | None, where: str = "this model") -> None:
    """A clear error for a head kind the model (and its MoDE head, or None) cannot decode with."""
    check_kind(kind)
    if kind == "ensemble" and not has_ensemble(head):
        # Without a router there is nothing to mix: no head at all, or layerwise's norms only.
        method = METHODS["final-only" if head is None else "layerwise"]
        raise ModeError(f"{where} {method.why_no_ensemble()}")


def check_recipe_head_kind(kind: str, loss: str, where: str = "this model") -> None:
    """The same check from the recipe's method alone, before any weights load."""
    check_kind(kind)
    reason = method_of(loss).why_no_ensemble()
    if kind == "ensemble" and reason:
        raise ModeError(f"{where} {reason}")


def check_kind(kind: str) -> None:
    if kind not in HEAD_KINDS:
        raise ModeError(f"head={kind!r}: expected one of {', '.join(HEAD_KINDS)}")


def attach(model: nn.Module, head: MoDEHead, kind: str = "ensemble") -> EnsembleHead:
    """Make `model` decode from the MoDE ensemble (or its final layer, `kind="final"`).

    Works on a plain transformers CausalLM or a peft model around one; idempotent. Undo with
    `detach`. Saving the model while attached would save the wrapper: detach first.
    """
    check_head_kind(kind, head)
    existing = ensemble_of(model)
    if existing is not None:
        if existing.head is not head:
            raise ValueError("another MoDE head is already attached to this model; detach it first")
        existing.kind = kind
        return existing
    base = families.base_of(model)
    family = families.family_of(base)
    if head.num_layers != families.num_layers(model):
        raise ModeError(
            f"the MoDE head was trained on a {head.num_layers}-layer model; this model has "
            f"{families.num_layers(model)} layers"
        )
    ensemble = EnsembleHead(families.lm_head(model), head, kind)
    layers = families.get_attr(base, family.layers)

    def keep(layer: int):
        def hook(module, args, output):
            if ensemble.mixing:
                ensemble.captured[layer] = output[0] if isinstance(output, tuple) else output

        return hook

    ensemble.hooks = [
        layers[layer - 1].register_forward_hook(keep(layer)) for layer in captured_layers(head)
    ]

    # Wrap the CausalLM's forward on the instance: peft calls `model.forward(...)` directly,
    # which no module hook would see. `functools.wraps` keeps the signature `generate()` inspects.
    original = base.__dict__.get("forward")
    forward = base.forward

    @functools.wraps(forward)
    def forward_with_ensemble(*args, **kwargs):
        ensemble.captured.clear()
        ensemble.in_forward = True
        ensemble.logits_to_keep = kwargs.get("logits_to_keep", 0)
        try:
            return forward(*args, **kwargs)
        finally:
            ensemble.in_forward = False
            ensemble.captured.clear()

    ensemble.original_forward = original
    base.forward = forward_with_ensemble
    parent, _, name = family.lm_head.rpartition(".")
    setattr(families.get_attr(base, parent) if parent else base, name, ensemble)
    return ensemble


def detach(model: nn.Module) -> None:
    """Put the original LM head and forward back (nothing to do when no head is attached)."""
    ensemble = ensemble_of(model)
    if ensemble is None:
        return
    base = families.base_of(model)
    family = families.family_of(base)
    for hook in ensemble.hooks:
        hook.remove()
    if ensemble.original_forward is None:
        del base.forward
    else:
        base.forward = ensemble.original_forward
    parent, _, name = family.lm_head.rpartition(".")
    setattr(families.get_attr(base, parent) if parent else base, name, ensemble.lm_head)


@contextmanager
def use_head(model: nn.Module, kind: str, head: MoDEHead | None = None) -> Iterator[nn.Module]:
    """Decode from `kind` (`ensemble` or `final`) inside the block; the model is as before after.

    `head` is needed only when no MoDE head is attached yet (a model from `mode_cli.load` has
    one attached when its run trained one).
    """
    attached = ensemble_of(model)
    if attached is not None:
        check_head_kind(kind, attached.head)
        before, attached.kind = attached.kind, kind
        try:
            yield model
        finally:
            attached.kind = before
        return
    check_head_kind(kind, head)
    if kind == "final":
        yield model
        return
    attach(model, head, kind)
    try:
        yield model
    finally:
        detach(model)
