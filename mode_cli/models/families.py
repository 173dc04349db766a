"""Where each supported architecture keeps the parts MoDE reads, and running its decoder.

A small table keyed by `config.model_type`, not guesswork: the decoder, its layers, the final norm,
the LM head and any logit function after the head (Gemma 2's soft-capping) differ by family. The
functions below accept a transformers CausalLM or a peft model wrapping one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from mode_cli.errors import ModeError


@dataclass(frozen=True)
class Family:
    """Where a model family keeps the parts MoDE needs, as attribute paths from the CausalLM.

    `softcap` names the config attribute holding the final-logit soft-capping value (None: the
    family has none); `logit_fn` turns it into the function every layer's logits go through.
    """

    decoder: str
    layers: str
    final_norm: str
    lm_head: str
    softcap: str | None = None


# A small table, not guesswork: the parts MoDE touches differ by architecture. Keyed by
# `config.model_type`; checked per family on tiny random-init models in tests/test_families.py.
# In transformers 5 every decoder here returns its final-normed state as the last hidden state.
FAMILIES: dict[str, Family] = {
    # RMSNorm; untied (Llama-3.2 1B/3B tie).
    "llama": Family(
        decoder="model", layers="model.layers", final_norm="model.norm", lm_head="lm_head"
    ),
    # RMSNorm; untied; sliding-window attention in v0.1.
    "mistral": Family(
        decoder="model", layers="model.layers", final_norm="model.norm", lm_head="lm_head"
    ),
    # RMSNorm; q/k/v biases; small sizes tie the embeddings.
    "qwen2": Family(
        decoder="model", layers="model.layers", final_norm="model.norm", lm_head="lm_head"
    ),
    # RMSNorm, plus per-head q_norm/k_norm inside attention; small sizes tie the embeddings.
    "qwen3": Family(
        decoder="model", layers="model.layers", final_norm="model.norm", lm_head="lm_head"
    ),
    # Offset RMSNorm (scale 1 + w); embeddings scaled by sqrt(hidden) inside the decoder; tied.
    "gemma": Family(
        decoder="model", layers="model.layers", final_norm="model.norm", lm_head="lm_head"
    ),
    # As Gemma, plus sandwich norms, sliding/global layers and final-logit soft-capping; tied.
    "gemma2": Family(
        decoder="model",
        layers="model.layers",
        final_norm="model.norm",
        lm_head="lm_head",
        softcap="final_logit_softcapping",
    ),
    # RMSNorm; fused qkv_proj and gate_up_proj; untied.
    "phi3": Family(
        decoder="model", layers="model.layers", final_norm="model.norm", lm_head="lm_head"
    ),
    # LayerNorm (with bias); parallel residual; untied. The head is `lm_head` in transformers 5
    # (checkpoints' `embed_out.weight` is renamed on load).
    "gpt_neox": Family(
        decoder="gpt_neox",
        layers="gpt_neox.layers",
        final_norm="gpt_neox.final_layer_norm",
        lm_head="lm_head",
    ),
}


def family_of(model: PreTrainedModel) -> Family:
    """The family entry for a loaded model; an unsupported architecture is a clear error."""
    model_type = model.config.model_type
    if model_type not in FAMILIES:
        raise ModeError(
            f"Unsupported architecture '{model_type}'. Supported: {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[model_type]


def get_attr(root: nn.Module, path: str) -> nn.Module:
    """`get_attr(model, "model.norm")`: follow a dotted attribute path."""
    for part in path.split("."):
        root = getattr(root, part)
    return root


def base_of(model: nn.Module) -> PreTrainedModel:
    """The transformers CausalLM under a peft wrapper, or under the MoDE model `mode` decodes
    through (`decode.ensemble.wrap` keeps the model it was built around); else the model itself."""
    model = getattr(model, "loaded_model", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def num_layers(model: nn.Module) -> int:
    return len(get_attr(base_of(model), family_of(base_of(model)).layers))


def final_norm(model: nn.Module) -> nn.Module:
    return get_attr(base_of(model), family_of(base_of(model)).final_norm)


def lm_head(model: nn.Module) -> nn.Module:
    return get_attr(base_of(model), family_of(base_of(model)).lm_head)


def decoder_paths(model: nn.Module) -> tuple[str, str]:
    """Where the decoder layers and the final norm are inside the decoder (`layers`, `norm`):
    what a MoDE model built around this model's decoder reads (`modeling_mode.MoDEModel`)."""
    family = family_of(base_of(model))
    prefix = family.decoder + "."
    return family.layers.removeprefix(prefix), family.final_norm.removeprefix(prefix)


def logit_fn(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """What the model does to logits after the LM head, or None when it does nothing.

    Gemma 2 soft-caps its final logits: `cap * tanh(z / cap)`. Every layer's logits and the
    ensemble's must go through it to match the model's own prediction (`docs/method.md`, "Logit
    quirks").
    """
    base = base_of(model)
    family = family_of(base)
    cap = getattr(base.config, family.softcap, None) if family.softcap else None
    if not cap:
        return None
    cap = float(cap)

    def softcap(logits: torch.Tensor) -> torch.Tensor:
        return cap * torch.tanh(logits / cap)

    return softcap


def hidden_states(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    final_norm_input: bool = False,
):
    """Run the decoder alone (no full-vocabulary logits) and return all N+1 hidden states.

    Packed sequences (`data.packing`) pass `position_ids` that restart at 0 at every example; the
    decoder is then run without the attention mask, so that transformers builds a block-diagonal
    causal mask from the restarts (sliding windows included): no attention across examples, and
    padding, given positions of its own, is a block nothing real attends to.

    hidden_states[0] is the embedding output (Gemma's already scaled by sqrt(hidden)),
    hidden_states[l] the output of layer l before the final norm, and the last one has the final
    norm applied: `lm_head(hidden_states[-1])` (through `logit_fn`) is the model's own logits.
    `final_norm_input=True` returns layer N's state before the final norm there instead (what a
    MoDE head with its own trainable norm for layer N reads).
    """
    base = base_of(model)
    family = family_of(base)
    decoder = get_attr(base, family.decoder)
    captured: list[torch.Tensor] = []
    hook = None
    if final_norm_input:
        norm = get_attr(base, family.final_norm)
        hook = norm.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    try:
        out = decoder(
            input_ids=input_ids,
            attention_mask=attention_mask if position_ids is None else None,
            position_ids=position_ids,
            output_hidden_states=True,
            use_cache=False,
        )
    finally:
        if hook is not None:
            hook.remove()
    if final_norm_input:
        return (*out.hidden_states[:-1], captured[0])
    # transformers 5 already puts the final-normed state last (the same tensor as
    # last_hidden_state) for every family here; taking last_hidden_state keeps that contract
    # even for a decoder or config (`tie_last_hidden_states=False`) that would not.
    return (*out.hidden_states[:-1], out.last_hidden_state)
