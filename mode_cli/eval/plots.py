"""`layers.png`: the per-layer report as a picture (metric by depth, base vs tuned).

Two panels share the depth axis: next-token loss (log scale) and top-1 accuracy. Each side of the
report (base, tuned) is one curve over layers 1..N; the MoDE layers are shaded and marked; the
ensemble of each side is a dashed horizontal line in that side's colour. Rendered with
matplotlib's Agg backend: no display needed.

`layers_figure` returns the Figure, so what is drawn can be read back (`ax.lines`, by label).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

from matplotlib.figure import Figure  # noqa: E402  (the backend is chosen first)
from matplotlib.ticker import (  # noqa: E402
    FuncFormatter,
    LogLocator,
    MaxNLocator,
    NullFormatter,
)

from mode_cli.eval.render import report_sides  # noqa: E402

COLOURS = {"base": "tab:gray", "tuned": "tab:blue"}
PANELS = (("loss", "loss (nats / token)"), ("top1", "top-1 accuracy"))


def layers_figure(report: dict) -> Figure:
    """The figure of a report: loss and top-1 by depth, one line per side, ensembles dashed.

    Line labels: `base`, `tuned` (per layer) and `base ensemble`, `tuned ensemble`.
    """
    figure = Figure(figsize=(8, 6.5), layout="constrained")
    axes = figure.subplots(2, 1, sharex=True)
    layers = [row["layer"] for row in report["layers"]]
    selected = [row["layer"] for row in report["layers"] if row["selected"]]
    ensemble = report.get("ensemble") or {}
    for ax, (key, label) in zip(axes, PANELS, strict=True):
        for layer in selected:
            ax.axvspan(layer - 0.5, layer + 0.5, color="tab:orange", alpha=0.12, linewidth=0)
        for side in report_sides(report):
            values = [row[side][key] for row in report["layers"]]
            ax.plot(layers, values, marker="o", markersize=3, color=COLOURS[side], label=side)
            marked = [row[side][key] for row in report["layers"] if row["selected"]]
            ax.scatter(selected, marked, s=40, facecolors="none", edgecolors="tab:orange", zorder=3)
            if ensemble.get(side):
                ax.axhline(
                    ensemble[side][key],
                    color=COLOURS[side],
                    linestyle="--",
                    linewidth=1,
                    label=f"{side} ensemble",
                )
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if key == "loss":
            values = [v for line in ax.lines for v in line.get_ydata() if v > 0]
            # Early layers' losses can be ten times the final one's: a log scale keeps both legible.
            if values and max(values) > 5 * min(values):
                ax.set_yscale("log")
                ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
                ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
                ax.yaxis.set_minor_formatter(NullFormatter())
        else:
            ax.set_ylim(0, 1)
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    shaded = "; shaded: MoDE layers" if selected else ""
    axes[-1].set_xlabel(f"layer (1-{report['num_layers']}){shaded}")
    axes[0].legend(loc="best", fontsize="small")
    title = report.get("recipe") or report.get("model") or ""
    figure.suptitle(f"Per-layer eval: {title}", fontsize="medium")
    return figure


def save_layers_plot(report: dict, path: Path) -> Path:
    """Draw the report's figure into a PNG file."""
    layers_figure(report).savefig(path, dpi=110)
    return path
