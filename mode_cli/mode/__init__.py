"""The MoDE method in plain PyTorch: no CLI, Hydra, omegaconf or rich.

    from mode_cli.mode import MoDEHead, LossWeights, chunked_mode_loss
    head = MoDEHead(final_norm=model.model.norm, layers=[28, 29, 30], num_layers=30, hidden_size=576)
    states = model.model(ids, output_hidden_states=True).hidden_states
    normed, weights = head({l: states[l][keep] for l in head.layers})
    loss = chunked_mode_loss(normed, weights, labels, model.lm_head, LossWeights()).total

Modules, in the order the data flows:

- `selection`: which late layers form the ensemble;
- `head`: the per-layer norms and the router (`MoDEHead`);
- `methods`: the methods a recipe's `loss.name` picks (what each trains and decodes with);
- `weighting`: the weights of the loss terms at each step (layerwise scales, curricula);
- `terms`: the loss's coefficients and which terms a call computes;
- `loss`: the objective and its naive reference; `chunked`: the memory-lean implementation.

Names are imported on first use, so `import mode_cli.mode.methods` does not load torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "MoDEHead": "head",
    "has_ensemble": "head",
    "select_layers": "selection",
    "Method": "methods",
    "METHODS": "methods",
    "method_of": "methods",
    "loss_weights": "weighting",
    "LossWeights": "terms",
    "LossSums": "terms",
    "head_logits": "terms",
    "mode_loss": "loss",
    "final_only_loss": "loss",
    "IMPLEMENTATIONS": "loss",
    "chunked_mode_loss": "chunked",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
