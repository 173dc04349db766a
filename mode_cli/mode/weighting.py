"""Loss weighting: from a recipe's `loss` section to the weights of each term of the MoDE loss at a
given optimizer step, by the method's `weighting` (`methods.py`).

    ensemble   a_ens = ensemble_weight, a_l = layer_weight, lambda = distill_weight (0 for a
               method that does not distil: mode-nodistill)
    layerwise  a_ens = 0, a_l from the scale rule over the layers the curriculum has on,
               normalised to sum to 1 (LayerSkip's early-exit loss); no router
    final      plain cross-entropy on the final layer (`terms.FINAL_ONLY`; no MoDE head)

`loss_cfg` is anything with the `LossConfig` attributes (a recipe's DictConfig, a dataclass).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from mode_cli.mode.methods import method_of
from mode_cli.mode.terms import FINAL_ONLY, LossWeights

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


# Which layers have their per-layer loss on at each step (`loss.curriculum`).
CURRICULA = ("none", "rotational", "gradual")


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


def loss_weights(loss_cfg, layers: Sequence[int], step: int, total_steps: int) -> LossWeights:
    """The weights of every loss term at `step` for the recipe's `loss` section."""
    method = method_of(loss_cfg.name)
    if method.weighting == "final":
        return FINAL_ONLY
    if method.weighting == "layerwise":
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
    distill = loss_cfg.distill_weight if method.distills else 0.0
    per_layer = tuple([loss_cfg.layer_weight] * len(layers)) if loss_cfg.layer_weight else ()
    return LossWeights(
        ensemble=loss_cfg.ensemble_weight,
        layers=per_layer,
        distill=distill,
        temperature=loss_cfg.temperature,
        teacher=loss_cfg.teacher,
    )
