"""The per-layer eval report: where in the network the answer forms, and what tuning changed.

For every decoder layer (logit lens: the layer's state through a norm and the shared LM head; the
trained norm for layers in the MoDE selection, the final norm elsewhere), for the ensemble, and for
the base model before tuning (adapter off, untrained head): loss, perplexity and next-token top-1
accuracy on the eval split's response tokens, plus the router's weight per selected layer.
"""

from __future__ import annotations

import json
import math
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
from mode_cli.head import MoDEHead
from mode_cli.loss import head_logits

SCHEMA = {"name": "mode-report", "version": 1}


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
) -> dict:
    """Per-layer, ensemble and router statistics of one model (+ head) on a dataset."""
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
    routed = head is not None and head.router_kind != "none"
    selected = head.layers if routed else []
    router_sum = torch.zeros(len(selected), dtype=torch.float64)
    router_sq = torch.zeros(len(selected), dtype=torch.float64)
    examples = dataset.examples[:max_examples] if max_examples else dataset.examples
    for start in range(0, len(examples), batch_size):
        batch = data_mod.collate(examples[start : start + batch_size], tokenizer.pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        states = model_mod.hidden_states(model, batch["input_ids"], batch["attention_mask"])
        targets = batch["labels"][:, 1:]
        keep = targets != IGNORE
        labels = targets[keep]
        at_targets = {layer: states[layer][:, :-1][keep] for layer in range(1, n + 1)}
        for layer in range(1, n):
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
        "layers": [t.result() for t in layers],
        "ensemble": ensemble.result() if routed else None,
        "router": router,
        "tokens": tokens,
        "examples": len(examples),
    }


def evaluate(
    cfg: DictConfig, model, head: MoDEHead | None, dataset: Dataset, tokenizer, device: str
) -> dict:
    """The whole report: tuned model and (unless `eval.compare_base=false`) the base before tuning."""
    tuned = layer_metrics(
        model, head, dataset, tokenizer, device, cfg.eval.batch_size, cfg.eval.max_examples
    )
    base = None
    if cfg.eval.compare_base:
        # The base before tuning: adapter off, and a freshly initialised head (what step 0 saw).
        base_head = None
        if head is not None:
            base_head = MoDEHead.from_description(model_mod.final_norm(model), head.describe())
            base_head = base_head.to(device)
        # A mode-only run has no adapter: its base is the model itself.
        adapter_off = (
            model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()
        )
        with adapter_off:
            base = layer_metrics(
                model,
                base_head,
                dataset,
                tokenizer,
                device,
                cfg.eval.batch_size,
                cfg.eval.max_examples,
            )
    n = len(tuned["layers"])
    selected = head.layers if head is not None else []
    rows = []
    for layer in range(1, n + 1):
        rows.append(
            {
                "layer": layer,
                "selected": layer in selected,
                "tuned": tuned["layers"][layer - 1],
                "base": base["layers"][layer - 1] if base else None,
                "router_weight": tuned["router"].get(layer),
            }
        )
    ensemble = None
    if tuned["ensemble"] is not None:
        ensemble = {"tuned": tuned["ensemble"], "base": base["ensemble"] if base else None}
    return {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "recipe": cfg.recipe,
        "model": cfg.model.name_or_path,
        "loss": cfg.loss.name,
        "num_layers": n,
        "selected_layers": selected,
        "eval_examples": tuned["examples"],
        "eval_tokens": tuned["tokens"],
        "layers": rows,
        "ensemble": ensemble,
    }


# ---------------------------------------------------------------------------- presenting


def _fmt(metrics: dict | None, key: str) -> str:
    if metrics is None:
        return "-"
    value = metrics[key]
    return (
        f"{value:.2f}"
        if key == "perplexity" and value < 1e6
        else (
            f"{value:.3e}"
            if key == "perplexity"
            else f"{value:.4f}"
            if key == "loss"
            else f"{value:.3f}"
        )
    )


def table_rows(report: dict) -> list[list[str]]:
    """Rows of the report's table: one per layer, then the ensemble."""
    rows = []
    for row in report["layers"]:
        name = f"{row['layer']}" + (" *" if row["selected"] else "")
        if row["layer"] == report["num_layers"]:
            name += " (final)"
        weight = row["router_weight"]
        rows.append(
            [
                name,
                _fmt(row["base"], "loss"),
                _fmt(row["tuned"], "loss"),
                _fmt(row["tuned"], "perplexity"),
                _fmt(row["base"], "top1"),
                _fmt(row["tuned"], "top1"),
                f"{weight['mean']:.3f} ± {weight['std']:.3f}" if weight else "",
            ]
        )
    if report["ensemble"]:
        ens = report["ensemble"]
        rows.append(
            [
                "ensemble",
                _fmt(ens["base"], "loss"),
                _fmt(ens["tuned"], "loss"),
                _fmt(ens["tuned"], "perplexity"),
                _fmt(ens["base"], "top1"),
                _fmt(ens["tuned"], "top1"),
                "",
            ]
        )
    return rows


HEADER = [
    "layer",
    "base loss",
    "tuned loss",
    "tuned ppl",
    "base top-1",
    "tuned top-1",
    "router weight",
]


def summary_line(report: dict) -> str:
    final = report["layers"][-1]
    line = f"final layer eval loss: base {_fmt(final['base'], 'loss')} -> tuned {_fmt(final['tuned'], 'loss')}"
    if report["ensemble"]:
        ens = report["ensemble"]
        line += (
            f"; ensemble: base {_fmt(ens['base'], 'loss')} -> tuned {_fmt(ens['tuned'], 'loss')}"
        )
    return line


def to_markdown(report: dict) -> str:
    lines = [
        f"# Per-layer report: {report['recipe']}",
        "",
        f"Model `{report['model']}`, loss `{report['loss']}`, {report['num_layers']} layers; "
        f"MoDE layers (*): {report['selected_layers'] or 'none'}. "
        f"Eval: {report['eval_examples']} examples, {report['eval_tokens']} response tokens.",
        "",
        summary_line(report) + ".",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "---|" * len(HEADER),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(report)]
    lines += [
        "",
        "Loss and top-1 are next-token metrics on response tokens. Each layer is read through the "
        "LM head after a norm (logit lens): the trained MoDE norm for selected layers, the final "
        "norm elsewhere. Base: the model before tuning (adapter off, untrained MoDE head).",
        "",
    ]
    return "\n".join(lines)


def write_report(report: dict, out: Path) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(to_markdown(report))


def print_report(report: dict, console: Console) -> None:
    table = Table(
        title=f"Per-layer eval ({report['eval_examples']} examples, {report['eval_tokens']} tokens)"
    )
    for column in HEADER:
        table.add_column(column, justify="left" if column == "layer" else "right")
    for row in table_rows(report):
        table.add_row(*row, style="bold" if row[0] == "ensemble" else None)
    console.print(table)
    console.print(summary_line(report))
