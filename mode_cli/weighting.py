"""Loss-weighting recipes: from `loss.name` (and, for `layerwise`, a scale rule and a curriculum)
to the weights of each term of the MoDE loss at a given optimizer step.

    mode            a_ens = ensemble_weight, a_l = layer_weight, lambda = distill_weight
    mode-nodistill  the same with lambda = 0
    mode-only       as `mode`; the adapter is left out (the MoDE head trains alone)
    layerwise       a_ens = 0, a_l from the scale rule over the layers the curriculum has on,
                    normalised to sum to 1 (LayerSkip's early-exit loss); no router
    final-only      no MoDE head at all: handled by the caller
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from omegaconf import DictConfig

from mode_cli.loss import LossWeights

SCALES = {
    "uniform": lambda layer: 1.0,
    "linear": lambda layer: float(layer),
    "sqrt": lambda layer: math.sqrt(layer),
    "inverse": lambda layer: 1.0 / layer,
    "inverse_sqrt": lambda layer: 1.0 / math.sqrt(layer),
}


def layer_scale(layers: Sequence[int], rule: str) -> list[float]:
    """Per-layer weights by depth (1-based layer numbers), normalised to sum to 1."""
    raw = [SCALES[rule](layer) for layer in layers]
    total = sum(raw)
    return [value / total for value in raw]


def curriculum(
    num_selected: int, kind: str, step: int, total_steps: int, period: int
) -> list[bool]:
    """Which selected layers (ascending, N last) have their per-layer loss on at `step` (1-based).

    rotational: layer N always, plus one other layer at a time, moving every `period` steps.
    gradual: layers switched on from the last one backwards, evenly over the run.
    """
    if kind == "none" or num_selected == 1:
        return [True] * num_selected
    if kind == "rotational":
        early = ((step - 1) // period) % (num_selected - 1)
        return [i == early or i == num_selected - 1 for i in range(num_selected)]
    if kind == "gradual":
        active = math.ceil(num_selected * step / max(1, total_steps))
        active = min(num_selected, max(1, active))
        return [i >= num_selected - active for i in range(num_selected)]
    raise ValueError(f"unknown curriculum {kind!r}")


def loss_weights(
    loss_cfg: DictConfig, layers: Sequence[int], step: int, total_steps: int
) -> LossWeights:
    """The weights of every loss term at `step` for the recipe's `loss` section."""
    if loss_cfg.name == "layerwise":
        on = curriculum(
            len(layers), loss_cfg.curriculum, step, total_steps, loss_cfg.curriculum_period
        )
        active = [layer for layer, flag in zip(layers, on, strict=True) if flag]
        scale = dict(zip(active, layer_scale(active, loss_cfg.scale), strict=True))
        return LossWeights(
            ensemble=0.0,
            layers=tuple(scale.get(layer, 0.0) for layer in layers),
            distill=loss_cfg.distill_weight,
            temperature=loss_cfg.temperature,
            teacher="final",
        )
    distill = 0.0 if loss_cfg.name == "mode-nodistill" else loss_cfg.distill_weight
    per_layer = tuple([loss_cfg.layer_weight] * len(layers)) if loss_cfg.layer_weight else ()
    return LossWeights(
        ensemble=loss_cfg.ensemble_weight,
        layers=per_layer,
        distill=distill,
        temperature=loss_cfg.temperature,
        teacher=loss_cfg.teacher,
    )
