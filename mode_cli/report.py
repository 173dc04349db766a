"""The eval report: where in the network the answer forms, and what tuning changed.

For every decoder layer (logit lens: the layer's state through a norm and the shared LM head; the
trained norm for layers in the MoDE selection, the final norm elsewhere), for the ensemble, and for
the base model before tuning (adapter off, untrained head): loss, perplexity and next-token top-1
accuracy on the eval split's response tokens, plus the router's weight per selected layer; for data
with reference answers, exact-match accuracy of greedy generations with the ensemble and the final
head (`answers.py`).

Each report is a folder `<time>/` (under `<run>/eval/` by default) holding:

- `report.json`: the schema below (documented in full in `docs/report-schema.md`);
- `report.md`: the same as tables a person reads;
- `layers.png`: loss and top-1 by depth, base vs tuned (`plots.py`).

`report.json`, schema `{"name": "mode-report", "version": 2}`:

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
    answers          null, or {field, match, examples, max_new_tokens, heads: {ensemble?, final:
                     {correct, accuracy}}, agreement: {both_right, ensemble_only, final_only,
                     both_wrong} | null, disagreements: {ensemble_only: [...], final_only: [...]}
                     | null}; a disagreement is {index, prompt, reference, ensemble, final}

A plain model (no run) is reported as its own base: `sides` is ["base"] and every `tuned` is null.
Version 2 added source, sides, data, answers and the report folder; version 1 readers that use
`layers[i].{layer, selected, tuned, base, router_weight}` and `ensemble.{tuned, base}` still work.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path

import torch
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from mode_cli import data as data_mod
from mode_cli import model as model_mod
from mode_cli.data import IGNORE, Dataset
from mode_cli.head import MoDEHead, has_ensemble
from mode_cli.loss import head_logits

SCHEMA = {"name": "mode-report", "version": 2}
EVAL_FOLDER = "eval"


class Tally:
    """Running sums of cross-entropy and top-1 hits over tokens."""

    def __init__(self) -> None:
        self.loss = 0.0
        self.correct = 0
        self.tokens = 0

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.loss += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        self.correct += int((logits.argmax(-1) == labels).sum())
        self.tokens += labels.numel()

    def result(self) -> dict[str, float]:
        loss = self.loss / max(1, self.tokens)
        return {
            "loss": loss,
            "perplexity": math.exp(min(loss, 700.0)),
            "top1": self.correct / max(1, self.tokens),
        }


@torch.no_grad()
def layer_metrics(
    model,
    head: MoDEHead | None,
    dataset: Dataset,
    tokenizer,
    device: str,
    batch_size: int,
    max_examples: int | None,
    only_layers: Collection[int] | None = None,
) -> dict:
    """Per-layer, ensemble and router statistics of one model (+ head) on a dataset.

    only_layers: read just these layers through the LM head (and the final one); the others'
    entries in `layers` are None. Eval during training asks only for the selected layers.
    """
    was_training = model.training
    model.eval()
    n = model_mod.num_layers(model)
    lm_head = model_mod.lm_head(model)
    final_norm = model_mod.final_norm(model)
    logit_fn = model_mod.logit_fn(model)

    def logits(states: torch.Tensor) -> torch.Tensor:
        # Every layer, and the ensemble, read through the head and its quirks (soft-capping).
        return head_logits(lm_head, states, logit_fn)

    layers = [Tally() for _ in range(n)]
    ensemble = Tally()
    routed = has_ensemble(head)
    selected = head.layers if routed else []
    router_sum = torch.zeros(len(selected), dtype=torch.float64)
    router_sq = torch.zeros(len(selected), dtype=torch.float64)
    wanted = set(range(1, n + 1)) if only_layers is None else {*only_layers, n}
    # The router reads the selected layers' states, whatever is reported.
    needed = sorted(wanted | set(selected))
    examples = dataset.examples[:max_examples] if max_examples else dataset.examples
    for start in range(0, len(examples), batch_size):
        batch = data_mod.collate(examples[start : start + batch_size], tokenizer.pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        states = model_mod.hidden_states(model, batch["input_ids"], batch["attention_mask"])
        targets = batch["labels"][:, 1:]
        keep = targets != IGNORE
        labels = targets[keep]
        at_targets = {layer: states[layer][:, :-1][keep] for layer in needed}
        for layer in sorted(wanted - {n}):
            norm = (
                head.norms[str(layer)]
                if head is not None and str(layer) in head.norms
                else final_norm
            )
            layers[layer - 1].add(logits(norm(at_targets[layer])), labels)
        layers[n - 1].add(logits(at_targets[n]), labels)
        if routed:
            normed, weights = head(at_targets)
            ensemble.add(logits(MoDEHead.mix(normed, weights)), labels)
            router_sum += weights.double().sum(0).cpu()
            router_sq += (weights.double() ** 2).sum(0).cpu()
    model.train(was_training)
    tokens = layers[-1].tokens
    router = {}
    for i, layer in enumerate(selected):
        mean = router_sum[i].item() / max(1, tokens)
        var = max(0.0, router_sq[i].item() / max(1, tokens) - mean**2)
        router[layer] = {"mean": mean, "std": math.sqrt(var)}
    return {
        "layers": [t.result() if i + 1 in wanted else None for i, t in enumerate(layers)],
        "ensemble": ensemble.result() if routed else None,
        "router": router,
        "tokens": tokens,
        "examples": len(examples),
    }


def fresh_head(head: MoDEHead | None, model, device: str) -> MoDEHead | None:
    """A freshly initialised head shaped like `head`: what step 0 of training saw."""
    if head is None:
        return None
    return MoDEHead.from_description(model_mod.final_norm(model), head.describe()).to(device)


def run_base_metrics(cfg: DictConfig, model, head, dataset, tokenizer, device: str) -> dict:
    """The base before tuning, from the run's own model: adapter off, an untrained head."""
    # A mode-only run has no adapter: its base is the model itself.
    adapter_off = model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()
    with adapter_off:
        return layer_metrics(
            model,
            fresh_head(head, model, device),
            dataset,
            tokenizer,
            device,
            cfg.eval.batch_size,
            cfg.eval.max_examples,
        )


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
) -> dict:
    """The report (schema version 2) from the metrics of each side."""
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
    }


def evaluate(
    cfg: DictConfig,
    model,
    head: MoDEHead | None,
    dataset: Dataset,
    tokenizer,
    device: str,
    *,
    source: dict | None = None,
    answers: dict | None = None,
) -> dict:
    """The report of a run's model: tuned and (unless `eval.compare_base=false`) the base before
    tuning, from the same model with its adapter off and an untrained head."""
    tuned = layer_metrics(
        model, head, dataset, tokenizer, device, cfg.eval.batch_size, cfg.eval.max_examples
    )
    base = None
    if cfg.eval.compare_base:
        base = run_base_metrics(cfg, model, head, dataset, tokenizer, device)
    selected = head.layers if head is not None else []
    return assemble(cfg, tuned=tuned, base=base, selected=selected, source=source, answers=answers)


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
    from mode_cli.plots import save_layers_plot

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


def latest_report(run_dir: Path) -> Path | None:
    """The newest `run_dir/eval/<time>/report.json`, or None when the run has none."""
    reports = [p for p in (Path(run_dir) / EVAL_FOLDER).glob("*/report.json") if p.is_file()]
    if not reports:
        return None
    return max(reports, key=lambda p: _folder_order(p.parent))


# ---------------------------------------------------------------------------- presenting

METRICS = (("loss", "loss"), ("perplexity", "ppl"), ("top1", "top-1"))


def _fmt(metrics: dict | None, key: str) -> str:
    if metrics is None:
        return "-"
    value = metrics[key]
    if key == "perplexity":
        return f"{value:.2f}" if value < 1e6 else f"{value:.3e}"
    return f"{value:.4f}" if key == "loss" else f"{value:.3f}"


def report_sides(report: dict) -> list[str]:
    """The sides the report holds: `base`, `tuned` or both."""
    from mode_cli.plots import report_sides as sides

    return sides(report)


def has_router(report: dict) -> bool:
    return any(row["router_weight"] for row in report["layers"])


def header(report: dict) -> list[str]:
    """Column names of the per-layer table: each metric for each side the report holds."""
    sides = report_sides(report)
    columns = ["layer"]
    for _, short in METRICS:
        columns += [f"{side} {short}" if len(sides) > 1 else short for side in sides]
    if has_router(report):
        columns.append("router weight")
    return columns


def table_rows(report: dict) -> list[list[str]]:
    """Rows of the per-layer table: one per layer, then the ensemble."""
    sides = report_sides(report)
    router = has_router(report)
    rows = []
    for row in report["layers"]:
        name = f"{row['layer']}" + (" *" if row["selected"] else "")
        if row["layer"] == report["num_layers"]:
            name += " (final)"
        cells = [name] + [_fmt(row[side], key) for key, _ in METRICS for side in sides]
        if router:
            weight = row["router_weight"]
            cells.append(f"{weight['mean']:.3f} ± {weight['std']:.3f}" if weight else "")
        rows.append(cells)
    if report["ensemble"]:
        ens = report["ensemble"]
        cells = ["ensemble"] + [_fmt(ens[side], key) for key, _ in METRICS for side in sides]
        rows.append(cells + ([""] if router else []))
    return rows


def summary_line(report: dict) -> str:
    """One line: final-layer (and ensemble) eval loss, base -> tuned where both exist."""

    def change(metrics: dict) -> str:
        parts = [f"{side} {_fmt(metrics[side], 'loss')}" for side in report_sides(report)]
        return " -> ".join(parts)

    line = f"final layer eval loss: {change(report['layers'][-1])}"
    if report["ensemble"]:
        line += f"; ensemble: {change(report['ensemble'])}"
    return line


def answers_rows(answers: dict) -> list[list[str]]:
    """Rows of the answer-accuracy table: one per head."""
    n = answers["examples"]
    return [
        [head, f"{result['correct']} / {n}", f"{result['accuracy']:.3f}"]
        for head, result in answers["heads"].items()
    ]


AGREEMENT_NAMES = {
    "both_right": "both right",
    "ensemble_only": "ensemble right, final wrong",
    "final_only": "final right, ensemble wrong",
    "both_wrong": "both wrong",
}


def _fenced(text: str) -> str:
    return "```text\n" + text.replace("```", "'''").rstrip() + "\n```"


def answers_markdown(answers: dict) -> list[str]:
    lines = [
        "## Answer accuracy",
        "",
        f"Greedy generation (up to {answers['max_new_tokens']} new tokens) on the first "
        f"{answers['examples']} eval rows, compared with their `{answers['field']}` field after "
        f"`{answers['match']}` normalisation.",
        "",
        "| head | correct | exact match |",
        "|---|---|---|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in answers_rows(answers)]
    if answers["agreement"]:
        lines += ["", "| ensemble vs final | examples |", "|---|---|"]
        lines += [
            f"| {AGREEMENT_NAMES[kind]} | {count} |" for kind, count in answers["agreement"].items()
        ]
        for kind, examples in answers["disagreements"].items():
            if not examples:
                continue
            lines += ["", f"### {AGREEMENT_NAMES[kind].capitalize()}"]
            for example in examples:
                lines += [
                    "",
                    f"Eval row {example['index'] + 1}, reference `{example['reference']}`.",
                    "",
                    "Prompt:",
                    "",
                    _fenced(example["prompt"]),
                    "",
                    "Ensemble:",
                    "",
                    _fenced(example["ensemble"]),
                    "",
                    "Final layer:",
                    "",
                    _fenced(example["final"]),
                ]
    return lines


def to_markdown(report: dict) -> str:
    """The report for people: provenance, the per-layer table, answer accuracy."""
    columns = header(report)
    source = report["source"]
    kinds = {"run": "run folder", "merged": "merged model", "model": "model (no run)"}
    selected = ", ".join(map(str, report["selected_layers"])) or "none"
    data = report["data"]
    lines = [
        f"# Eval report: {report['recipe'] or report['model']}",
        "",
        "| | |",
        "|---|---|",
        f"| checkpoint | `{source['checkpoint']}` ({kinds[source['kind']]}) |",
        f"| model | `{report['model']}` |",
    ]
    if report["loss"]:
        lines.append(f"| loss recipe | `{report['loss']}` |")
    lines += [
        f"| layers | {report['num_layers']}; MoDE layers (*): {selected} |",
        f"| eval data | `{data['eval']}`: {data['examples']} examples, {data['tokens']:,} "
        f"response tokens (max_seq_len {data['max_seq_len']}) |",
        f"| compared | {' vs '.join(report['sides'])} |",
        f"| created | {report['created']} |",
        "",
        summary_line(report) + ".",
        "",
        "## Per-layer metrics",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(report)]
    lines += [
        "",
        "Loss (nats per token), perplexity and top-1 are next-token metrics on response tokens. "
        "Each layer is read through the LM head after a norm (logit lens): the trained MoDE norm "
        "for selected layers, the final norm elsewhere. Base: the model before tuning (adapter "
        "off, untrained MoDE head). Router weight: the tuned router's mean weight per token, ± its "
        "standard deviation across tokens. Plot: `layers.png`.",
    ]
    if report.get("answers"):
        lines += ["", *answers_markdown(report["answers"])]
    return "\n".join(lines) + "\n"


def print_report(report: dict, console: Console) -> None:
    """The per-layer table (and answer accuracy) in the terminal."""
    # A log or a pipe gets one line per row, not rich's 80-column default for non-terminals.
    if not console.is_terminal and console.width < 140:
        console.width = 140
    table = Table(
        title=f"Per-layer eval ({report['eval_examples']} examples, {report['eval_tokens']} tokens)"
    )
    for column in header(report):
        table.add_column(column, justify="left" if column == "layer" else "right")
    for row in table_rows(report):
        table.add_row(*row, style="bold" if row[0] == "ensemble" else None)
    console.print(table)
    console.print(summary_line(report), soft_wrap=True)
    answers = report.get("answers")
    if answers:
        console.print(
            f"answer accuracy: {answers['examples']} greedy generations, "
            f"`{answers['match']}` match on `{answers['field']}`",
            soft_wrap=True,
        )
        table = Table("head", "correct", "exact match")
        for row in answers_rows(answers):
            table.add_row(*row)
        console.print(table)
        if answers["agreement"]:
            console.print(
                "; ".join(
                    f"{AGREEMENT_NAMES[kind]}: {count}"
                    for kind, count in answers["agreement"].items()
                ),
                soft_wrap=True,
            )
