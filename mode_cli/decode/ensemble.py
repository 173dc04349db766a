"""Decoding with the MoDE ensemble: a loaded model and its trained head as the exported model class.

The ensemble's logits are `f(W . sum_l w_l Norm_l(h_l))`: the model's own LM head `W` (and what
the model does after it, Gemma 2's soft-capping) applied to the mixed state. `MoDEForCausalLM`
(`models/modeling_mode.py`, the code an export of `mode` carries) computes exactly that, and
`mode` decodes through it too, so there is one implementation of the ensemble's forward:

    with use_head(model, "ensemble", head) as decoder:   # the model's modules, shared, not copied
        decoder.generate(**inputs)                       # KV cache as usual
    with use_head(decoder, "final"): ...                 # layer N alone, same object

`wrap` builds it around a transformers CausalLM or a peft model around one (the adapter's layers
sit inside the decoder it shares). `docs/method.md`, "Choices the paper leaves open" (decoding
with the ensemble).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from mode_cli.errors import ModeError
from mode_cli.mode.head import MoDEHead, has_ensemble
from mode_cli.mode.methods import HEAD_KINDS, METHODS, method_of
from mode_cli.models import families
from mode_cli.models.modeling_mode import MoDEForCausalLM


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


def wrap(model: nn.Module, head: MoDEHead, kind: str = "ensemble") -> MoDEForCausalLM:
    """`model` (a transformers CausalLM of a supported family, or a peft model around one) and its
    trained head as a `MoDEForCausalLM` that shares their modules; decoding with `kind`.

    The wrapper keeps hooks on the model's selected decoder layers: `unwrap` removes them. Its
    `loaded_model` is `model`, which `families` reads through (`families.final_norm(wrapper)`)."""
    check_head_kind(kind, head)
    n = families.num_layers(model)
    if head.num_layers != n:
        raise ModeError(
            f"the MoDE head was trained on a {head.num_layers}-layer model; this model has "
            f"{n} layers"
        )
    layers, final_norm = families.decoder_paths(model)
    wrapped = MoDEForCausalLM.around(families.base_of(model), head, layers, final_norm)
    wrapped.model.ensemble = kind == "ensemble"
    wrapped.train(model.training)
    # Not a submodule (its modules are the wrapper's already): what `families` reads through.
    object.__setattr__(wrapped, "loaded_model", model)
    return wrapped


def unwrap(wrapped: MoDEForCausalLM) -> None:
    """Take a wrapper's hooks off the model it was built around (the model is as before)."""
    wrapped.model.remove_hooks()


def head_of(model: nn.Module) -> MoDEHead | None:
    """The MoDE head a model decodes through (a `MoDEForCausalLM`'s), or None."""
    return model.model.mode_head if isinstance(model, MoDEForCausalLM) else None


@contextmanager
def use_head(model: nn.Module, kind: str, head: MoDEHead | None = None) -> Iterator[nn.Module]:
    """Yield the model that decodes with `kind` (`ensemble` or `final`) inside the block.

    A `MoDEForCausalLM` (what `mode_cli.load` returns for a run with an ensemble) switches its
    head for the block. Any other model decodes `final` as it is, and `ensemble` through a wrapper
    around it and `head`, taken off again after the block.
    """
    if isinstance(model, MoDEForCausalLM):
        check_head_kind(kind, head_of(model))
        before, model.model.ensemble = model.model.ensemble, kind == "ensemble"
        try:
            yield model
        finally:
            model.model.ensemble = before
        return
    check_head_kind(kind, head)
    if kind == "final":
        yield model
        return
    wrapped = wrap(model, head, kind)
    try:
        yield wrapped
    finally:
        unwrap(wrapped)
