"""Layer selection: which decoder layers (1-based, N = the model's depth) form the MoDE ensemble.

`docs/method.md`, "Selection". The final layer N is always selected.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def last_k(num_layers: int, k: int) -> list[int]:
    """The last k layers, 1-based: last_k(30, 3) == [28, 29, 30]."""
    if not 1 <= k <= num_layers:
        raise ValueError(f"k={k} is outside 1..{num_layers} (the model has {num_layers} layers)")
    return list(range(num_layers - k + 1, num_layers + 1))


def every_n(num_layers: int, every: int, of_last: int) -> list[int]:
    """Every `every`-th of the last `of_last` layers, ending at N: every_n(30, 2, 6) == [26, 28, 30]."""
    if not 1 <= of_last <= num_layers:
        raise ValueError(
            f"of_last={of_last} is outside 1..{num_layers} (the model has {num_layers} layers)"
        )
    if every < 1:
        raise ValueError(f"every={every}: expected at least 1")
    return sorted(range(num_layers, num_layers - of_last, -every))


def fraction_of_depth(num_layers: int, fraction: float) -> list[int]:
    """The last `fraction` of the layers, rounded up: fraction_of_depth(30, 0.1) == [28, 29, 30]."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction={fraction} is outside (0, 1]")
    return last_k(num_layers, max(1, math.ceil(fraction * num_layers - 1e-9)))


def explicit(num_layers: int, indices: Sequence[int]) -> list[int]:
    """Explicit layers, 1-based, negative ones from the end (-1 is N); N is always added."""
    chosen = set()
    for index in indices:
        layer = num_layers + 1 + index if index < 0 else index
        if not 1 <= layer <= num_layers:
            raise ValueError(
                f"indices: layer {index} is out of range: the model has {num_layers} layers "
                f"(use 1..{num_layers}, or -1..-{num_layers} from the end)"
            )
        chosen.add(layer)
    chosen.add(num_layers)
    return sorted(chosen)


# `layers.select` of a recipe, by name.
SELECTIONS = ("last_k", "every_n", "fraction")


def select_layers(layers_cfg, num_layers: int) -> list[int]:
    """The layers a recipe's `layers` section selects in a model of `num_layers` layers.

    `layers_cfg` is anything with the `LayersConfig` attributes; `indices`, when set, overrides
    the `select` rule. A ValueError names the key that does not fit this model.
    """
    if layers_cfg.indices is not None:
        return explicit(num_layers, layers_cfg.indices)
    if layers_cfg.select == "every_n":
        return every_n(num_layers, layers_cfg.every, layers_cfg.of_last)
    if layers_cfg.select == "fraction":
        return fraction_of_depth(num_layers, layers_cfg.fraction)
    if layers_cfg.select == "last_k":
        return last_k(num_layers, layers_cfg.k)
    raise ValueError(f"select={layers_cfg.select!r}: expected one of {', '.join(SELECTIONS)}")
