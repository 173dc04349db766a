"""The MoDE head: per-layer norms and a router that mix late layers into one prediction.

Plain `torch.nn`, no dependency on the CLI or the training loop (METHOD.md 2-4):

    head = MoDEHead(final_norm=model.model.norm, layers=[28, 29, 30], num_layers=30, hidden_size=576)
    states = model.model(ids, output_hidden_states=True).hidden_states
    normed, weights = head(states)                 # [|S|, ..., H], [..., |S|]
    logits = lm_head(head.mix(normed, weights))    # the ensemble: one head matmul

Layers are numbered 1..N as in `hidden_states[l]` (0 is the embedding output). Layer N uses the
model's own final norm, frozen; every other selected layer gets a trainable copy of it,
initialised from its weights. The router's weights start at `init_final_weight` on layer N and
share the rest equally, so the untrained ensemble stays close to the base model's prediction.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from torch import nn

ROUTERS = ("token",)


class MoDEHead(nn.Module):
    """Norms for the selected late layers and a token router over them.

    Args:
        final_norm: the model's final norm module (copied for each selected layer below N; the
            module itself is not stored, so the head's state holds only its own weights).
        layers: selected layers, 1-based, ascending; must end with `num_layers`.
        num_layers: N, the model's number of decoder layers.
        hidden_size: the model's hidden size (the router's input width).
        router: `token`, a linear router per token on the final layer's normalised state.
        init_final_weight: the router's initial weight on layer N, in (0, 1).
    """

    def __init__(
        self,
        final_norm: nn.Module,
        layers: Sequence[int],
        num_layers: int,
        hidden_size: int,
        router: str = "token",
        init_final_weight: float = 0.9,
    ) -> None:
        super().__init__()
        layers = [int(layer) for layer in layers]
        if layers != sorted(set(layers)) or not layers:
            raise ValueError(f"layers must be ascending and unique, got {layers}")
        if layers[-1] != num_layers or layers[0] < 1:
            raise ValueError(f"layers must lie in 1..{num_layers} and end with {num_layers}")
        if router not in ROUTERS:
            raise ValueError(f"router must be one of {ROUTERS}, got {router!r}")
        self.layers = layers
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        self.router_kind = router
        self.init_final_weight = init_final_weight
        self.norms = nn.ModuleDict()
        for layer in layers[:-1]:
            norm = copy.deepcopy(final_norm)
            for param in norm.parameters():
                param.data = param.data.float()
                param.requires_grad_(True)
            self.norms[str(layer)] = norm
        self.router = nn.Linear(hidden_size, len(layers))
        self.reset_router()

    def reset_router(self) -> None:
        """Zero the router's weights; biases give layer N `init_final_weight`, the rest equal."""
        nn.init.zeros_(self.router.weight)
        with torch.no_grad():
            self.router.bias.copy_(router_bias(len(self.layers), self.init_final_weight))

    def normed(self, hidden_states: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """`Norm_l(h_l)` for each selected layer; layer N's state arrives already normalised.

        `hidden_states` is indexed by layer number: the model's tuple, or a dict holding only the
        selected layers (for instance after dropping masked positions).
        """
        # fp32 from here on: the loss is computed in fp32 whatever the model's compute dtype.
        out = [self.norms[str(layer)](hidden_states[layer]).float() for layer in self.layers[:-1]]
        out.append(hidden_states[self.num_layers].float())
        return out

    def route(self, final_normed: torch.Tensor) -> torch.Tensor:
        """Routing weights `softmax(U . Norm_N(h_N) + b)` over the selected layers, per token."""
        return torch.softmax(self.router(final_normed.to(self.router.weight.dtype)), dim=-1)

    def forward(self, hidden_states: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Stacked normalised states `[|S|, ..., H]` and routing weights `[..., |S|]`."""
        normed = self.normed(hidden_states)
        return torch.stack(normed), self.route(normed[-1])

    @staticmethod
    def mix(normed: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """`sum_l w_l Norm_l(h_l)`: the head is linear, so this fed to it gives the mixed logits."""
        return torch.einsum("s...h,...s->...h", normed, weights.to(normed.dtype))

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
            "trainable_parameters": sum(p.numel() for p in self.parameters()),
        }


def router_bias(num_selected: int, init_final_weight: float) -> torch.Tensor:
    """Logits whose softmax puts `init_final_weight` on the last entry and equal shares elsewhere."""
    if num_selected == 1:
        return torch.zeros(1)
    rest = (1.0 - init_final_weight) / (num_selected - 1)
    bias = torch.full((num_selected,), math.log(rest))
    bias[-1] = math.log(init_final_weight)
    return bias


def last_k(num_layers: int, k: int) -> list[int]:
    """The last k layers, 1-based: last_k(30, 3) == [28, 29, 30]."""
    if not 1 <= k <= num_layers:
        raise ValueError(f"k={k} is outside 1..{num_layers} (the model has {num_layers} layers)")
    return list(range(num_layers - k + 1, num_layers + 1))
