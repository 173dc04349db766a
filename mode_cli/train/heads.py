"""The MoDE head a recipe asks for, built on a model: its layer selection checked against the
model's depth, its router and norms as the recipe's `layers` and `router` sections say."""

from __future__ import annotations

from omegaconf import DictConfig

from mode_cli.config import method
from mode_cli.errors import ModeError
from mode_cli.mode.head import MoDEHead
from mode_cli.mode.selection import select_layers
from mode_cli.models import families


def selected_layers(cfg: DictConfig, num_layers: int) -> list[int]:
    """The layers the recipe's MoDE head reads in a model `num_layers` deep (the `layers` section
    checked against that depth); none for a method without a head."""
    if not method(cfg).trains_head:
        return []
    try:
        return select_layers(cfg.layers, num_layers)
    except ValueError as err:
        raise ModeError(f"layers.{err}") from None


def build_head(cfg: DictConfig, model, device: str) -> MoDEHead | None:
    """The MoDE head for this recipe, or None for a method without one (the final-only baseline)."""
    if not method(cfg).trains_head:
        return None
    n = families.num_layers(model)
    layers = selected_layers(cfg, n)
    router = cfg.router
    try:
        head = MoDEHead(
            final_norm=families.final_norm(model),
            layers=layers,
            num_layers=n,
            hidden_size=families.base_of(model).config.hidden_size,
            # A method without a router (layerwise) trains per-layer exits: norms, no ensemble.
            router=router.kind if method(cfg).routed else "none",
            init_final_weight=router.init_final_weight if router.init == "final" else None,
            fixed_weights=router.weights,
            router_input=router.input,
            detach_input=router.detach_input,
            train_final_norm=cfg.layers.train_final_norm,
        )
    except ValueError as err:
        raise ModeError(f"router: {err}") from None
    return head.to(device)
