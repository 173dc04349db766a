"""The training methods a recipe's `loss.name` picks: one row each, read wherever a rule depends
on the method (what is trained, which loss weighting applies, which heads a run can decode with).

| method         | adapter | MoDE head | router | weighting | decodes with       |
|----------------|---------|-----------|--------|-----------|--------------------|
| mode           | yes     | yes       | yes    | ensemble  | ensemble, final    |
| mode-nodistill | yes     | yes       | yes    | ensemble (no distillation) | ensemble, final |
| final-only     | yes     | no        | no     | final     | final              |
| layerwise      | yes     | norms     | no     | layerwise | final              |
| mode-only      | no      | yes       | yes    | ensemble  | ensemble, final    |

See `docs/method.md`, "Methods (loss recipes)".
"""

from __future__ import annotations

from dataclasses import dataclass

# What a finished run decodes with: the routed ensemble of the selected layers, or layer N alone.
HEAD_KINDS = ("ensemble", "final")


@dataclass(frozen=True)
class Method:
    """One training method.

    Attributes:
        name: the `loss.name` that selects it.
        summary: one line for people.
        trains_adapter: a peft adapter (LoRA/DoRA) is attached and trained.
        trains_head: a MoDE head (per-layer norms, maybe a router) is built and trained.
        routed: the head has a router, so there is an ensemble to train and decode from.
        weighting: how the loss terms are weighted (`mode.weighting`): `ensemble` (the MoDE
            formula), `layerwise` (per-layer CE by a depth scale, no ensemble) or `final` (plain
            cross-entropy on the final layer).
        distills: whether the distillation term may have weight.
    """

    name: str
    summary: str
    trains_adapter: bool
    trains_head: bool
    routed: bool
    weighting: str
    distills: bool = True

    @property
    def heads(self) -> tuple[str, ...]:
        """The head kinds a run of this method decodes with."""
        return HEAD_KINDS if self.routed else ("final",)

    @property
    def default_head(self) -> str:
        """What a run of this method decodes and exports with unless told otherwise: the ensemble
        when it trained one."""
        return self.heads[0]

    def why_no_ensemble(self) -> str | None:
        """Why this method's runs cannot decode with the ensemble; None when they can."""
        if self.routed:
            return None
        if not self.trains_head:
            return (
                f"has no MoDE head (trained with loss={self.name}): use head=final to decode "
                "from its final layer"
            )
        return (
            f"has per-layer norms but no router (loss={self.name}), so no ensemble: use head=final"
        )


METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        Method(
            "mode",
            "LoRA + MoDE: ensemble cross-entropy and distillation into the late layers",
            trains_adapter=True,
            trains_head=True,
            routed=True,
            weighting="ensemble",
        ),
        Method(
            "mode-nodistill",
            "LoRA + MoDE without the distillation term",
            trains_adapter=True,
            trains_head=True,
            routed=True,
            weighting="ensemble",
            distills=False,
        ),
        Method(
            "final-only",
            "plain QLoRA: cross-entropy on the final layer, no MoDE head (the baseline)",
            trains_adapter=True,
            trains_head=False,
            routed=False,
            weighting="final",
            distills=False,
        ),
        Method(
            "layerwise",
            "per-layer cross-entropy weighted by depth, no router (LayerSkip's early-exit loss)",
            trains_adapter=True,
            trains_head=True,
            routed=False,
            weighting="layerwise",
        ),
        Method(
            "mode-only",
            "the MoDE head trained alone on the frozen base, no adapter",
            trains_adapter=False,
            trains_head=True,
            routed=True,
            weighting="ensemble",
        ),
    )
}


def method_of(name: str) -> Method:
    """The method a `loss.name` selects; a ValueError naming the choices for anything else."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}: expected one of {', '.join(METHODS)}") from None
