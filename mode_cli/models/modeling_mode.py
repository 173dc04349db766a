"""MoDE (Mixture-of-Depths Ensemble) as a transformers model: a model family's own decoder whose
output is the routed mix of its last layers, `sum_l w_l Norm_l(h_l)`.

The LM head is linear, so the ensemble's logits `W . sum_l w_l Norm_l(h_l)` are the model's own
head applied to that mixed state. The mix is therefore made in the base model's forward
(`MoDEModel`, what `AutoModel` returns): an engine that applies its own LM head to the base
model's last hidden state (vLLM's and SGLang's Transformers backends do) computes the ensemble's
logits with one projection. `MoDEForCausalLM` adds the model's own head and what the family does
after it (Gemma 2's final-logit soft-capping).

This file and `mode_head.py` (the per-layer norms and the router) are the whole code of a model
exported by `mode`; they import only torch and transformers. Load an export with

    AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)

`mode` itself decodes through the same classes (`MoDEForCausalLM.around` wraps a loaded model
and a trained head without copying either). See `docs/method.md`, "Decoding with the ensemble".
"""

from __future__ import annotations

import copy
import functools

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

try:  # in an exported folder: the head's code is the file saved beside this one
    from .mode_head import MoDEHead
except ImportError:  # inside the mode_cli package
    from mode_cli.mode.head import MoDEHead

# What `auto_map` names in an export's config.json: the classes below, found in this file.
AUTO_MAP = {
    "AutoConfig": "modeling_mode.MoDEConfig",
    "AutoModel": "modeling_mode.MoDEModel",
    "AutoModelForCausalLM": "modeling_mode.MoDEForCausalLM",
}
# The MoDE fields of the config; every other field is the base model's own.
MODE_FIELDS = ("base_model_type", "mode_head", "mode_layers", "mode_final_norm")
# Fields a saved config carries about itself, never handed to the base model's config.
OWN_FIELDS = ("model_type", "architectures", "auto_map", "transformers_version")


class MoDEConfig(PretrainedConfig):
    """The base model's config, field for field, plus what MoDE adds.

    The base model's fields stay at the top level (`hidden_size`, `num_hidden_layers`, ...), where
    engines read them to size the KV cache and the LM head.

    Args:
        base_model_type: the `model_type` of the base family (`llama`, `gemma2`, `gpt_neox`, ...).
        mode_head: the MoDE head: its selected layers (1-based; the last one is the final layer),
            router kind and sizes, as `mode_head.py`'s `MoDEHead.describe()` writes it.
        mode_layers: where the decoder layers are in the base model (`layers`).
        mode_final_norm: where the final norm is in the base model (`norm`, `final_layer_norm`).
    """

    model_type = "mode"

    def __init__(
        self,
        base_model_type: str = "llama",
        mode_head: dict | None = None,
        mode_layers: str = "layers",
        mode_final_norm: str = "norm",
        **kwargs,
    ) -> None:
        self.base_model_type = base_model_type
        self.mode_head = dict(mode_head or {})
        self.mode_layers = mode_layers
        self.mode_final_norm = mode_final_norm
        super().__init__(**kwargs)

    @classmethod
    def from_base(
        cls, base: PretrainedConfig, mode_head: dict, mode_layers: str, mode_final_norm: str
    ) -> MoDEConfig:
        """The MoDE config of a model with `base`'s config and the head `mode_head` describes."""
        fields = {
            key: value
            for key, value in base.to_dict().items()
            # A loaded 4-bit model's quantization is how it was loaded, not part of the model.
            if key not in (*OWN_FIELDS, "quantization_config") and not key.startswith("_")
        }
        return cls(
            base_model_type=base.model_type,
            mode_head=mode_head,
            mode_layers=mode_layers,
            mode_final_norm=mode_final_norm,
            auto_map=dict(AUTO_MAP),
            **fields,
        )

    def base_config(self) -> PretrainedConfig:
        """The base family's own config, with this config's attention implementation."""
        fields = {
            key: value
            for key, value in self.to_dict().items()
            if key not in (*MODE_FIELDS, *OWN_FIELDS) and not key.startswith("_")
        }
        config = AutoConfig.for_model(self.base_model_type, **fields)
        # An engine picks the attention implementation on this config (vLLM sets "vllm"); the
        # family's decoder must see the same.
        config._attn_implementation = self._attn_implementation
        return config


def submodule(root: nn.Module, path: str) -> nn.Module:
    """`submodule(model, "layers")`: follow a dotted attribute path."""
    for part in path.split("."):
        root = getattr(root, part)
    return root


class MoDEPreTrainedModel(PreTrainedModel):
    """What MoDE models share: the config class, and weights that stay as a loaded model had them
    when a model is built around it (`MoDEForCausalLM.around`)."""

    config_class = MoDEConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    # Attention is the family decoder's own: it checks the implementation it is given.
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    # Keyword arguments reach the family's attention through every module, and attention goes
    # through transformers' attention interface: what vLLM's Transformers backend checks.
    _supports_attention_backend = True
    # The head stays whole on one device, and in fp32 when the model loads in 16 bits.
    _no_split_modules = ["MoDEHead"]
    _keep_in_fp32_modules_strict = ["mode_head"]
    _shares_weights = False

    def get_correct_attn_implementation(
        self, requested_attention: str | None, is_init_check: bool = False
    ) -> str | None:
        # The family's decoder inside checks the request and picks its own default (Gemma 2:
        # eager); deciding here for it would force a default it may not support.
        return requested_attention

    def init_weights(self) -> None:
        # A model built around a loaded one shares its modules: initialising would overwrite them
        # (an adapter's weights, the trained head). Their weights and ties are set already.
        if self._shares_weights:
            return
        super().init_weights()


class MoDEModel(MoDEPreTrainedModel):
    """The base family's decoder, its output replaced by the MoDE mix of the selected layers.

    Forward hooks on the selected decoder layers keep their outputs during a forward (only then:
    other calls of the decoder leave nothing behind); the head normalises them (layer N's state
    arrives through the model's final norm, or with `train_final_norm` before it, for the head's
    own norm), routes and mixes. The result is `last_hidden_state`, in the decoder's dtype;
    `hidden_states` and the cache are the decoder's own. With `ensemble = False` the model is the
    base decoder unchanged (`mode`'s `head=final`).
    """

    def __init__(
        self,
        config: MoDEConfig,
        base: PreTrainedModel | None = None,
        mode_head: MoDEHead | None = None,
    ) -> None:
        super().__init__(config)
        self._shares_weights = base is not None
        self.base = base if base is not None else AutoModel.from_config(config.base_config())
        if mode_head is None:
            final_norm = submodule(self.base, config.mode_final_norm)
            mode_head = MoDEHead.from_description(final_norm, config.mode_head)
        self.mode_head = mode_head
        # What the decoder chose is what this model runs.
        config._attn_implementation_internal = self.base.config._attn_implementation
        self.ensemble = True
        self._states: dict[int, torch.Tensor] = {}
        self._capturing = False
        layers = submodule(self.base, config.mode_layers)
        kept = mode_head.layers if mode_head.train_final_norm else mode_head.layers[:-1]
        self._hooks = [
            layers[layer - 1].register_forward_hook(functools.partial(self._keep, layer))
            for layer in kept
        ]
        self.post_init()

    def _keep(self, layer: int, module: nn.Module, args, output) -> None:
        if self._capturing:
            self._states[layer] = output[0] if isinstance(output, tuple) else output

    def remove_hooks(self) -> None:
        """Take the hooks off the decoder's layers (a model built around a loaded one, when done
        with it); the model no longer mixes after this."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def get_input_embeddings(self) -> nn.Module:
        return self.base.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.base.set_input_embeddings(value)

    def get_decoder(self) -> nn.Module:
        # The mix is part of the decoder: an engine that compiles "the decoder" (vLLM compiles the
        # class this returns, with input_ids, position_ids and inputs_embeds dynamic) compiles
        # the whole.
        return self

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ):
        # Every other argument (the cache, an engine's attention metadata) goes to the decoder as
        # it came: the family's attention reads them.
        return_dict = kwargs.pop("return_dict", None)
        return_dict = self.config.return_dict if return_dict is None else return_dict
        self._states.clear()
        self._capturing = self.ensemble
        try:
            outputs = self.base(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                inputs_embeds=inputs_embeds,
                return_dict=True,
                **kwargs,
            )
        finally:
            self._capturing = False
        if self.ensemble:
            outputs.last_hidden_state = self.mix(outputs.last_hidden_state)
        return outputs if return_dict is not False else outputs.to_tuple()

    def mix(self, final: torch.Tensor) -> torch.Tensor:
        """`sum_l w_l Norm_l(h_l)` from the kept states and the decoder's final-normed output."""
        # The head's norms read the states in their own dtype (fp32 in a 16-bit model): a
        # LayerNorm refuses a mix of dtypes.
        dtype = next((p.dtype for p in self.mode_head.norms.parameters()), final.dtype)
        states = {layer: s.to(final.device, dtype) for layer, s in self._states.items()}
        self._states.clear()
        if not self.mode_head.train_final_norm:
            states[self.mode_head.num_layers] = final
        normed, weights = self.mode_head(states)
        return MoDEHead.mix(normed, weights).to(final.dtype)


class MoDEForCausalLM(MoDEPreTrainedModel, GenerationMixin):
    """`MoDEModel` and the base model's own LM head: causal-LM logits of the MoDE ensemble.

    What the family does after its head applies to the mixed logits too: Gemma 2 soft-caps them
    (`final_logit_softcapping`). Generation, the KV cache and the loss work as in any causal LM.
    """

    def __init__(
        self,
        config: MoDEConfig,
        model: MoDEModel | None = None,
        lm_head: nn.Module | None = None,
    ) -> None:
        super().__init__(config)
        self._shares_weights = model is not None
        self.model = model if model is not None else MoDEModel(config)
        self.lm_head = (
            lm_head
            if lm_head is not None
            else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )
        if getattr(config, "tie_word_embeddings", False):
            embeddings = self.model.base.get_input_embeddings()
            name = next(n for n, m in self.model.base.named_modules() if m is embeddings)
            self._tied_weights_keys = {"lm_head.weight": f"model.base.{name}.weight"}
        self.post_init()

    @classmethod
    def around(
        cls,
        causal_lm: PreTrainedModel,
        mode_head: MoDEHead,
        mode_layers: str = "layers",
        mode_final_norm: str = "norm",
    ) -> MoDEForCausalLM:
        """A MoDE model sharing the modules of a loaded causal LM of the base family (its decoder,
        with an adapter injected or in 4 bits if so, and its LM head) and a trained head: nothing
        is copied or initialised. `remove_hooks()` on `.model` when done with it."""
        config = MoDEConfig.from_base(
            causal_lm.config, mode_head.describe(), mode_layers, mode_final_norm
        )
        model = MoDEModel(config, base=causal_lm.base_model, mode_head=mode_head)
        wrapped = cls(config, model=model, lm_head=causal_lm.get_output_embeddings())
        wrapped.generation_config = copy.deepcopy(causal_lm.generation_config)
        return wrapped

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        kwargs.pop("return_dict", None)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            return_dict=True,
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs
            )
        rest = {key: value for key, value in outputs.items() if key != "last_hidden_state"}
        return CausalLMOutputWithPast(loss=loss, logits=logits, **rest)
