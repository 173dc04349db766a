"""The eval report: where in the network the answer forms, and what tuning changed.

For every decoder layer (logit lens: the layer's state through a norm and the shared LM head; the
trained norm for layers in the MoDE selection, the final norm elsewhere), for the ensemble, and for
the base model before tuning (adapter off, untrained head): loss, perplexity and next-token top-1
accuracy on the eval split's response tokens, plus the router's weight per selected layer; for data
with reference answers, exact-match accuracy of greedy generations with the base before tuning, the
tuned final head and the tuned ensemble, each with a 95% interval (`answers.py`). The numbers come from `metrics.py`; `render.py` turns a report into tables.

Each report is a folder `<time>/` (under `<run>/eval/` by default) holding:

- `report.json`: the schema below (documented in full in `docs/report-schema.md`);
- `report.md`: the same as tables a person reads;
- `layers.png`: loss and top-1 by depth, base vs tuned (`plots.py`).

`report.json`, schema `{"name": "mode-report", "version": 4}`:

    created          ISO 8601 time (UTC) the report was made
    source           {kind: run | merged | model, checkpoint: the folder or model id evaluated}
    recipe, loss     the run's recipe and loss recipe (null for a plain model)
    model            the model evaluated (the base's name_or_path, or the merged/model folder)
    num_layers       N
    selected_layers  the MoDE layers (1-based; [] without a MoDE head)
    sides            which of "base", "tuned" the report holds
    data             {eval: where the eval rows came from, examples, tokens, max_seq_len}
    eval_examples, eval_tokens   the same counts (kept from version 1)
    layers           one row per layer 1..N: {layer, selected, base, tuned, router_weight}; base
                     and tuned are {loss, perplexity, top1} or null; router_weight is {mean, std}
                     over tokens for a selected layer of a routed head, else null
    ensemble         {base, tuned} (each {loss, perplexity, top1} or null), or null without a router
    answers          null, or {field, match, examples, max_new_tokens, decoded_from, confidence,
                     interval, heads: {ensemble?, final: SCORE}, base: {final: SCORE} | null,
                     agreement: {both_right, ensemble_only, final_only, both_wrong} | null,
                     disagreements: {ensemble_only: [...], final_only: [...]} | null}; a SCORE is
                     {correct, accuracy, interval: [low, high]} (95% Wilson); a disagreement is
                     {index, prompt, reference, ensemble, final}
    lineage          a run's: {init_from: what it started from (init_from.json) or null,
                     extensions: [{from_step, from_max_steps, max_steps, schedule}]}; null for
                     a plain model

A plain model (no run) is reported as its own base: `sides` is ["base"] and every `tuned` is null.
Version 4 added lineage; version 3 added the base's answers and the intervals; version 2 added source, sides, data, answers
and the report folder. Each version only adds keys: a reader of an older version still works.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from omegaconf import DictConfig

from mode_cli.data.splits import Dataset
from mode_cli.eval.metrics import layer_metrics, run_base_metrics
from mode_cli.eval.plots import save_layers_plot
from mode_cli.eval.render import to_markdown
from mode_cli.mode.head import MoDEHead

SCHEMA = {"name": "mode-report", "version": 4}
EVAL_FOLDER = "eval"


def data_description(data_cfg: DictConfig) -> str:
    """Where the eval rows come from, in words."""
    if data_cfg.eval:
        return str(data_cfg.eval)
    held_out = f"(a held-out {data_cfg.eval_fraction:.0%} of its rows)"
    mix = data_cfg.get("mix") or []
    if mix:
        return "; ".join(str(src.eval or f"{src.train} {held_out}") for src in mix)
    return f"{data_cfg.train} {held_out}"


def assemble(
    cfg: DictConfig,
    *,
    tuned: dict | None,
    base: dict | None,
    selected: list[int],
    source: dict | None = None,
    answers: dict | None = None,
    lineage: dict | None = None,
) -> dict:
    """The report (schema version 4) from the metrics of each side; `lineage`, a run's
    (`artifacts.run_lineage`): what it started from and its extensions."""
    if tuned is None and base is None:
        raise ValueError("a report needs the metrics of at least one side")
    source = source or {"kind": "run", "checkpoint": cfg.output_dir}
    first = tuned or base
    n = len(first["layers"])
    router = (tuned or base)["router"]
    rows = []
    for layer in range(1, n + 1):
        rows.append(
            {
                "layer": layer,
                "selected": layer in selected,
                "tuned": tuned["layers"][layer - 1] if tuned else None,
                "base": base["layers"][layer - 1] if base else None,
                "router_weight": router.get(layer),
            }
        )
    ensemble = None
    if first["ensemble"] is not None:
        ensemble = {
            "tuned": tuned["ensemble"] if tuned else None,
            "base": base["ensemble"] if base else None,
        }
    plain = source["kind"] == "model"
    return {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": source,
        "recipe": None if plain else cfg.recipe or None,
        "model": source.get("model", cfg.model.name_or_path),
        "loss": None if plain else cfg.loss.name,
        "num_layers": n,
        "selected_layers": list(selected),
        "sides": [side for side, m in (("base", base), ("tuned", tuned)) if m is not None],
        "data": {
            "eval": data_description(cfg.data),
            "examples": first["examples"],
            "tokens": first["tokens"],
            "max_seq_len": cfg.data.max_seq_len,
        },
        "eval_examples": first["examples"],
        "eval_tokens": first["tokens"],
        "layers": rows,
        "ensemble": ensemble,
        "answers": answers,
        "lineage": lineage,
    }


# ---------------------------------------------------------------------------- files


def build_report(
    cfg: DictConfig,
    model,
    head: MoDEHead | None,
    dataset: Dataset,
    tokenizer,
    device: str,
    *,
    source: dict,
    answers: dict | None = None,
    base: dict | None = None,
    lineage: dict | None = None,
) -> dict:
    """The report of a model (and its MoDE head) on `dataset`.

    A plain model (`source["kind"] == "model"`) is reported as its own base. A run's or merged
    model is the tuned side; the base side is `base` when the caller measured it (a merged model
    holds no separate base), else, with `eval.compare_base`, the same model with its adapter off
    and an untrained head (`metrics.run_base_metrics`).
    """
    metrics = layer_metrics(
        model, head, dataset, tokenizer, device, cfg.eval.batch_size, cfg.eval.max_examples
    )
    selected = head.layers if head is not None else []
    if source["kind"] == "model":
        return assemble(
            cfg, tuned=None, base=metrics, selected=selected, source=source, answers=answers
        )
    if base is None and cfg.eval.compare_base:
        base = run_base_metrics(cfg, model, head, dataset, tokenizer, device)
    return assemble(
        cfg,
        tuned=metrics,
        base=base,
        selected=selected,
        source=source,
        answers=answers,
        lineage=lineage,
    )


# ---------------------------------------------------------------------------- files


def new_report_folder(parent: Path) -> Path:
    """A new, empty `parent/<YYYYmmdd-HHMMSS>` folder; `-2`, `-3`... when that time is taken, so
    an earlier report is never overwritten."""
    parent.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for attempt in range(1, 10_000):
        folder = parent / (stamp if attempt == 1 else f"{stamp}-{attempt}")
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        return folder
    raise RuntimeError(f"no free report folder name under {parent}")


def write_report(report: dict, folder: Path) -> Path:
    """`report.json`, `report.md` and `layers.png` into `folder`."""
    (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (folder / "report.md").write_text(to_markdown(report))
    save_layers_plot(report, folder / "layers.png")
    return folder


def save_report(report: dict, parent: Path) -> Path:
    """Write the report into a new timestamped folder under `parent`; returns that folder."""
    return write_report(report, new_report_folder(parent))


def _folder_order(folder: Path) -> tuple[str, int]:
    """`20261128-131100-2` sorts after `20261128-131100` and before `20261128-131100-10`."""
    parts = folder.name.split("-")
    suffix = parts[2] if len(parts) > 2 else ""
    return "-".join(parts[:2]), int(suffix) if suffix.isdigit() else 1


def training_report(run_dir: Path, output_dir: str | None = None) -> dict | None:
    """The newest report training wrote of `run_dir` (its source names a step; `mode eval`'s
    reports do not), from `run_dir/eval/` or from `output_dir` (the run's `eval.output_dir`,
    where other runs' reports may sit beside it). A folder with no report training marked (a
    merged folder, whose `eval/` holds `mode eval`'s; a run of a release that did not mark its
    reports): the newest in its `eval/`. A file that is not a report is passed over."""
    run_dir = Path(run_dir)
    parent = Path(output_dir) if output_dir else run_dir / EVAL_FOLDER
    found = {}  # path -> (marked by training, report)
    for path in parent.glob("*/report.json"):
        try:
            report = json.loads(path.read_text())
            source = report.get("source") or {}
            marked = "step" in source
        except (OSError, ValueError, AttributeError, TypeError):
            continue
        checkpoint = Path(str(source.get("checkpoint", ""))).resolve()
        if not output_dir or (marked and checkpoint == run_dir.resolve()):
            found[path] = (marked, report)
    if not found:
        return None
    return found[max(found, key=lambda p: (found[p][0], _folder_order(p.parent)))][1]


def latest_report(run_dir: Path) -> Path | None:
    """The newest `run_dir/eval/<time>/report.json`, or None when the run has none."""
    reports = [p for p in (Path(run_dir) / EVAL_FOLDER).glob("*/report.json") if p.is_file()]
    if not reports:
        return None
    return max(reports, key=lambda p: _folder_order(p.parent))
