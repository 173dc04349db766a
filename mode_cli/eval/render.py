"""A report for people: the per-layer table in Markdown (`report.md`) and in the terminal, and the
answer-accuracy tables (base, tuned final head, tuned ensemble, each with its 95% interval)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from mode_cli.eval.stats import wilson_interval

# The per-layer metrics, by key in the report and by column name in the tables.
METRIC_COLUMNS = (("loss", "loss"), ("perplexity", "ppl"), ("top1", "top-1"))
SIDES = ("base", "tuned")


def markdown_table(columns, rows) -> list[str]:
    """A Markdown table's lines: the header, the rule, one line per row."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _fmt(metrics: dict | None, key: str) -> str:
    if metrics is None:
        return "-"
    value = metrics[key]
    if key == "perplexity":
        return f"{value:.2f}" if value < 1e6 else f"{value:.3e}"
    return f"{value:.4f}" if key == "loss" else f"{value:.3f}"


def report_sides(report: dict) -> list[str]:
    """The sides a report holds, in order: `base`, `tuned` or both."""
    return [side for side in SIDES if any(row[side] for row in report["layers"])]


def has_router(report: dict) -> bool:
    return any(row["router_weight"] for row in report["layers"])


def header(report: dict) -> list[str]:
    """Column names of the per-layer table: each metric for each side the report holds."""
    sides = report_sides(report)
    columns = ["layer"]
    for _, short in METRIC_COLUMNS:
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
        cells = [name] + [_fmt(row[side], key) for key, _ in METRIC_COLUMNS for side in sides]
        if router:
            weight = row["router_weight"]
            cells.append(f"{weight['mean']:.3f} ± {weight['std']:.3f}" if weight else "")
        rows.append(cells)
    if report["ensemble"]:
        ens = report["ensemble"]
        cells = ["ensemble"] + [_fmt(ens[side], key) for key, _ in METRIC_COLUMNS for side in sides]
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


def answer_scores(answers: dict, model: str = "tuned") -> list[tuple[str, str, dict]]:
    """(model, head, score) for each rate the answers hold: the base before tuning, then the
    evaluated model's heads (`model` names them: `tuned`, or `model` for a plain model).

    A report written before intervals were kept (schema version 2) gets its Wilson interval
    computed from the counts here.
    """
    n = answers["examples"]
    scores = [("base", head, result) for head, result in (answers.get("base") or {}).items()]
    heads = sorted(answers["heads"].items(), key=lambda item: HEAD_ORDER.index(item[0]))
    scores += [(model, head, result) for head, result in heads]
    filled = []
    for side, head, result in scores:
        if result.get("interval") is None and n:
            result = {**result, "interval": list(wilson_interval(result["correct"], n))}
        filled.append((side, head, result))
    return filled


def answers_rows(answers: dict, model: str = "tuned") -> list[list[str]]:
    """Rows of the answer-accuracy table: model, head, correct, exact match, 95% interval."""
    n = answers["examples"]
    rows = []
    for side, head, result in answer_scores(answers, model):
        interval = result.get("interval")
        span = f"{interval[0]:.3f}-{interval[1]:.3f}" if interval else "-"
        rows.append([side, head, f"{result['correct']} / {n}", f"{result['accuracy']:.3f}", span])
    return rows


ANSWER_COLUMNS = ("model", "head", "correct", "exact match", "95% interval")
HEAD_ORDER = ("final", "ensemble")


def answers_model(report: dict) -> str:
    """What the answers' `heads` belong to: the tuned model, or a plain model itself."""
    return "model" if report["source"]["kind"] == "model" else "tuned"


AGREEMENT_NAMES = {
    "both_right": "both right",
    "ensemble_only": "ensemble right, final wrong",
    "final_only": "final right, ensemble wrong",
    "both_wrong": "both wrong",
}


def _fenced(text: str) -> str:
    return "```text\n" + text.replace("```", "'''").rstrip() + "\n```"


DECODED_FROM = {
    "dequantized": "a dequantized fp32 copy of the 4-bit model (the adapter merged in)",
    "loaded": "the model as loaded",
}


def answers_markdown(answers: dict, model: str = "tuned") -> list[str]:
    decoded = DECODED_FROM.get(answers.get("decoded_from", ""), "")
    lines = [
        "## Answer accuracy",
        "",
        f"Greedy generation (up to {answers['max_new_tokens']} new tokens) on the first "
        f"{answers['examples']} eval rows, compared with their `{answers['field']}` field after "
        f"`{answers['match']}` normalisation"
        + (f", decoded from {decoded}" if decoded else "")
        + ". Base: the model before tuning (adapter off, final layer). Interval: the 95% Wilson "
        "score interval of the rate.",
        "",
        *markdown_table(ANSWER_COLUMNS, answers_rows(answers, model)),
    ]
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
        *markdown_table(columns, table_rows(report)),
    ]
    lines += [
        "",
        "Loss (nats per token), perplexity and top-1 are next-token metrics on response tokens. "
        "Each layer is read through the LM head after a norm (logit lens): the trained MoDE norm "
        "for selected layers, the final norm elsewhere. Base: the model before tuning (adapter "
        "off, untrained MoDE head). Router weight: the tuned router's mean weight per token, ± its "
        "standard deviation across tokens. Plot: `layers.png`.",
    ]
    if report.get("answers"):
        lines += ["", *answers_markdown(report["answers"], answers_model(report))]
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
        table = Table(*ANSWER_COLUMNS)
        for row in answers_rows(answers, answers_model(report)):
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
