"""The MoDE head: per-layer norms and a router that mix late layers into one prediction.

Plain `torch.nn`, no dependency on the CLI or the training loop (`docs/method.md`, "Norms",
"Router" and "Ensemble"):

    head = MoDEHead(final_norm=model.model.norm, layers=[28, 29, 30], num_layers=30, hidden_size=576)
    states = model.model(ids, output_hidden_states=True).hidden_states
    normed, weights = head(states)                 # [|S|, ..., H], [..., |S|]
    logits = lm_head(head.mix(normed, weights))    # the ensemble: one head matmul

Layers are numbered 1..N as in `hidden_states[l]` (0 is the embedding output). Every selected
layer below N gets a trainable copy of the model's final norm, initialised from its weights. Layer
N uses the model's own final norm, frozen (its state arrives already normalised), or with
`train_final_norm` a trainable copy of its own (its state then arrives before the final norm:
`families.hidden_states(..., final_norm_input=True)`). The router's weights start at
`init_final_weight` on layer N and share the rest equally, so the untrained ensemble stays close to
the base model's prediction.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

# `router.kind` of a recipe; `none` (norms only, no ensemble) is the head of loss=layerwise.
ROUTERS = ("token", "scalar", "fixed")
ROUTER_KINDS = (*ROUTERS, "none")
# `router.init`: layer N starts at `init_final_weight` and the rest share the remainder, or all equal.
ROUTER_INITS = ("final", "uniform")
# `router.input`: what the token router reads.
ROUTER_INPUTS = ("final", "mean")


class MoDEHead(nn.Module):
    """Norms for the selected late layers and a router over them.

    Args:
        final_norm: the model's final norm module (copied for each selected layer below N; the
            module itself is not stored, so the head's state holds only its own weights).
        layers: selected layers, 1-based, ascending; must end with `num_layers`.
        num_layers: N, the model's number of decoder layers.
        hidden_size: the model's hidden size (the token router's input width).
        router: `token` (a linear router per token), `scalar` (one learned logit per layer),
            `fixed` (constant weights), or `none` (norms only: per-layer losses, no ensemble).
        init_final_weight: the initial weight on layer N, in (0, 1); None starts uniform.
        fixed_weights: the weights of a `fixed` router (normalised to sum to 1); None uses the
            initial weights.
        router_input: what the token router reads: `final` (`Norm_N(h_N)`) or `mean` (the mean
            of the selected layers' normalised states).
        detach_input: stop the router's gradient at its input.
        train_final_norm: give layer N a trainable copy of the final norm too (the model's own
            stays frozen for decoding with the final head); `normed` then expects layer N's state
            before the final norm.
    """

    def __init__(
        self,
        final_norm: nn.Module,
        layers: Sequence[int],
        num_layers: int,
        hidden_size: int,
        router: str = "token",
        init_final_weight: float | None = 0.9,
        fixed_weights: Sequence[float] | None = None,
        router_input: str = "final",
        detach_input: bool = False,
        train_final_norm: bool = False,
    ) -> None:
        super().__init__()
        layers = [int(layer) for layer in layers]
        if layers != sorted(set(layers)) or not layers:
            raise ValueError(f"layers must be ascending and unique, got {layers}")
        if layers[-1] != num_layers or layers[0] < 1:
            raise ValueError(f"layers must lie in 1..{num_layers} and end with {num_layers}")
        if router not in ROUTER_KINDS:
            raise ValueError(f"router must be one of {ROUTER_KINDS}, got {router!r}")
        if router_input not in ROUTER_INPUTS:
            raise ValueError(f"router_input must be one of {ROUTER_INPUTS}, got {router_input!r}")
        if fixed_weights is not None and len(fixed_weights) != len(layers):
            raise ValueError(
                f"fixed_weights has {len(fixed_weights)} entries for {len(layers)} layers {layers}"
            )
        self.layers = layers
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        self.router_kind = router
        self.init_final_weight = init_final_weight
        self.router_input = router_input
        self.detach_input = detach_input
        self.train_final_norm = train_final_norm
        self.norms = nn.ModuleDict()
        for layer in layers if train_final_norm else layers[:-1]:
            norm = copy.deepcopy(final_norm)
            for param in norm.parameters():
                param.data = param.data.float()
                param.requires_grad_(True)
            self.norms[str(layer)] = norm
        prior = router_bias(len(layers), init_final_weight)
        self.router: nn.Module | None = None
        if router == "token":
            self.router = nn.Linear(hidden_size, len(layers))
        elif router == "scalar":
            self.router_logits = nn.Parameter(prior.clone())
        elif router == "fixed":
            fixed = (
                torch.softmax(prior, 0) if fixed_weights is None else torch.tensor(fixed_weights)
            )
            self.register_buffer("fixed_weights", fixed.float() / fixed.sum())
        self.reset_router()

    @property
    def routed(self) -> bool:
        """Whether the head mixes its layers into an ensemble (loss=layerwise trains no router)."""
        return self.router_kind != "none"

    def reset_router(self) -> None:
        """Back to the initial routing: zero token-router weights, the prior in the biases."""
        prior = router_bias(len(self.layers), self.init_final_weight)
        with torch.no_grad():
            if self.router_kind == "token":
                nn.init.zeros_(self.router.weight)
                self.router.bias.copy_(prior)
            elif self.router_kind == "scalar":
                self.router_logits.copy_(prior)

    def normed(self, hidden_states: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """`Norm_l(h_l)` for each selected layer. Layer N's state arrives already normalised by
        the model's final norm, or, with `train_final_norm`, before it (its own norm applies).

        `hidden_states` is indexed by layer number: the model's tuple, or a dict holding only the
        selected layers (for instance after dropping masked positions).
        """
        # fp32 from here on: the loss is computed in fp32 whatever the model's compute dtype.
        out = [self._norm(layer, hidden_states[layer]).float() for layer in self.layers[:-1]]
        final = hidden_states[self.num_layers]
        if self.train_final_norm:
            final = self._norm(self.num_layers, final)
        out.append(final.float())
        return out

    def _norm(self, layer: int, state: torch.Tensor) -> torch.Tensor:
        norm = self.norms[str(layer)]
        if not torch.is_grad_enabled():
            return norm(state)
        # Recomputed in backward (a few elementwise passes): autograd then keeps only the input,
        # which is held anyway, instead of the norm's fp32 intermediates, one or two `[T, H]`
        # tensors per layer.
        return checkpoint(norm, state, use_reentrant=False)

    def route(self, normed: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor | None:
        """Routing weights `[..., |S|]` per token from the normalised states (stacked
        `[|S|, ..., H]`, or one `[..., H]` per selected layer); None when the head has no router.

        token: `softmax(U . x + b)` with x = `Norm_N(h_N)` (or the mean over layers); scalar:
        `softmax(b)`; fixed: the recipe's weights.
        """
        final = normed[-1]
        shape = (*final.shape[:-1], len(self.layers))
        if self.router_kind == "none":
            return None
        if self.router_kind == "fixed":
            return self.fixed_weights.expand(shape)
        if self.router_kind == "scalar":
            return torch.softmax(self.router_logits, dim=0).expand(shape)
        x = final if self.router_input == "final" else sum(normed) / len(normed)
        if self.detach_input:
            x = x.detach()
        return torch.softmax(self.router(x.to(self.router.weight.dtype)), dim=-1)

    def forward(
        self, hidden_states: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Stacked normalised states `[|S|, ..., H]` and routing weights `[..., |S|]` (or None)."""
        normed = self.normed(hidden_states)
        # Routed from the separate states: the router keeps its input for backward, and a view
        # of the stack would keep the whole `[|S|, T, H]` copy alive until then.
        return torch.stack(normed), self.route(normed)

    @staticmethod
    def mix(normed: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """`sum_l w_l Norm_l(h_l)`: the head is linear, so this fed to it gives the mixed logits."""
        return torch.einsum("s...h,...s->...h", normed, weights.to(normed.dtype))

    @classmethod
    def from_description(cls, final_norm: nn.Module, info: dict) -> MoDEHead:
        """A freshly initialised head with the shape and settings `describe()` recorded."""
        return cls(
            final_norm=final_norm,
            layers=info["layers"],
            num_layers=info["num_layers"],
            hidden_size=info["hidden_size"],
            router=info["router"],
            init_final_weight=info["init_final_weight"],
            fixed_weights=info.get("fixed_weights"),
            router_input=info.get("router_input", "final"),
            detach_input=info.get("detach_input", False),
            train_final_norm=info.get("train_final_norm", False),
        )

    def describe(self) -> dict:
        """What `mode_head.json` records: enough to rebuild the head around the same model."""
        return {
            "format": "mode-head",
            "version": 1,
            "layers": self.layers,
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "router": self.router_kind,
            "init_final_weight": self.init_final_weight,
            "fixed_weights": self.fixed_weights.tolist() if self.router_kind == "fixed" else None,
            "router_input": self.router_input,
            "detach_input": self.detach_input,
            "train_final_norm": self.train_final_norm,
            "trainable_parameters": sum(p.numel() for p in self.parameters()),
        }


def has_ensemble(head: MoDEHead | None) -> bool:
    """Whether there is an ensemble to decode from: a head with a router."""
    return head is not None and head.routed


def router_bias(num_selected: int, init_final_weight: float | None) -> torch.Tensor:
    """Logits whose softmax puts `init_final_weight` on the last entry and equal shares elsewhere
    (all equal when it is None)."""
    if num_selected == 1 or init_final_weight is None:
        return torch.zeros(num_selected)
    rest = (1.0 - init_final_weight) / (num_selected - 1)
    bias = torch.full((num_selected,), math.log(rest))
    bias[-1] = math.log(init_final_weight)
    return bias
