"""The bundled arithmetic eval set (`mode_cli/bundled/arithmetic/eval.jsonl`) as lm-eval documents.

Loaded from the file shipped with `mode`, so the tasks run offline. Each document carries the
Alpaca prompt the bundled recipes train with, the reference answer, and four choices for the
multiple-choice task: "The answer is N." for the true N and three near misses.
"""

from __future__ import annotations

import json

import datasets

from mode_cli.data.formats import alpaca_prompt
from mode_cli.files import resolve_bundled

EVAL_FILE = resolve_bundled("bundled:arithmetic/eval.jsonl")

CHOICES = 4


def near_misses(answer: int, count: int = CHOICES - 1) -> list[int]:
    """Wrong answers close to the right one (off by one, by ten, doubled): never negative."""
    misses: list[int] = []
    for candidate in (answer + 1, answer - 1, answer + 10, answer - 10, answer + 2, 2 * answer):
        if candidate >= 0 and candidate != answer and candidate not in misses:
            misses.append(candidate)
    return misses[:count]


def document(index: int, row: dict) -> dict:
    answer = int(row["answer"])
    gold = index % CHOICES  # the right answer's position rotates through the choices
    numbers = near_misses(answer)
    numbers.insert(gold, answer)
    return {
        "prompt": alpaca_prompt(row),
        "answer": row["answer"],
        "choices": [f"The answer is {n}." for n in numbers],
        "gold": gold,
    }


def load_arithmetic(**_metadata) -> datasets.DatasetDict:
    """The eval rows as a `test` split (lm-eval passes the task's metadata; none is needed)."""
    rows = [json.loads(line) for line in EVAL_FILE.read_text().splitlines() if line.strip()]
    docs = [document(i, row) for i, row in enumerate(rows)]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})
