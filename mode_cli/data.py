"""Instruction data: rows in Alpaca format -> prompt/response token ids with the prompt masked.

Rows come from a local .json/.jsonl file, a hub dataset id, or a file bundled with `mode`. Every
row needs a non-empty `instruction` and `output` (`input` is optional); a malformed row is reported
with its 1-based row number. Loss is on the response only: prompt positions get label -100.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig

from mode_cli.errors import ModeError
from mode_cli.model import resolve_bundled

IGNORE = -100

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


def alpaca_prompt(row: dict) -> str:
    """The Alpaca template around a row's instruction (and input, when it has one)."""
    if row.get("input"):
        return ALPACA_WITH_INPUT.format(instruction=row["instruction"], input=row["input"])
    return ALPACA_NO_INPUT.format(instruction=row["instruction"])


@dataclass
class Example:
    """One tokenized example: `labels` is -100 on the prompt, token ids on the response."""

    input_ids: list[int]
    labels: list[int]

    @property
    def trained_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE)


@dataclass
class DataStats:
    """What happened to the rows on their way to examples."""

    rows: int = 0
    skipped: list[str] = field(default_factory=list)
    truncated: int = 0
    dropped_empty: int = 0
    tokens: int = 0
    trained_tokens: int = 0


@dataclass
class Dataset:
    """A tokenized split and how it was made."""

    examples: list[Example]
    stats: DataStats


# ---------------------------------------------------------------------------- reading rows


def read_rows(source: str, split: str = "train") -> list[dict | BadLine]:
    """All rows of a source: a local .json/.jsonl file, `bundled:<path>`, or a hub dataset id."""
    if source.startswith("bundled:"):
        return read_file(resolve_bundled(source))
    path = Path(source).expanduser()
    if path.suffix in (".json", ".jsonl") or path.exists():
        if not path.is_file():
            raise ModeError(f"Data file not found: {source}")
        return read_file(path)
    return read_hub(source, split)


@dataclass(frozen=True)
class BadLine:
    """A line of a JSON-lines file that does not parse: reported like any malformed row."""

    line: int
    error: str


def read_file(path: Path) -> list[dict | BadLine]:
    """Rows of a JSON list or a JSON-lines file (a line that is not JSON becomes a BadLine)."""
    # utf-8-sig: files saved by some editors start with a byte-order mark.
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix == ".json" or text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise ModeError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(rows, list):
            raise ModeError(f"{path}: expected a JSON list of objects")
        return rows
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            rows.append(BadLine(number, err.msg))
    return rows


def read_hub(dataset_id: str, split: str) -> list[dict]:
    """A split of a hub dataset, through `datasets` (cached; honours HF_DATASETS_OFFLINE)."""
    import datasets

    try:
        return list(datasets.load_dataset(dataset_id, split=split))
    except Exception as err:  # datasets raises many types for a missing or unreachable dataset
        raise ModeError(
            f"Could not load dataset '{dataset_id}' (split '{split}'): {str(err).splitlines()[0]}"
        ) from None


def check_rows(rows: list[dict], source: str, on_bad_row: str) -> tuple[list[dict], list[str]]:
    """Keep well-formed Alpaca rows; a bad one is an error, or skipped and listed."""
    good, bad = [], []
    for number, row in enumerate(rows, start=1):
        if isinstance(row, BadLine):
            message = f"{source}, line {row.line}: not valid JSON ({row.error})"
        elif (problem := row_problem(row)) is not None:
            message = f"{source}, row {number}: {problem}"
        else:
            good.append(row)
            continue
        if on_bad_row == "error":
            raise ModeError(message + " (set data.on_bad_row=skip to drop such rows)")
        bad.append(message)
    return good, bad


def row_problem(row: object) -> str | None:
    if not isinstance(row, dict):
        return f"expected an object with instruction/input/output, got {type(row).__name__}"
    for key in ("instruction", "output"):
        if key not in row:
            return f"missing field '{key}'"
        if not isinstance(row[key], str):
            return f"field '{key}' is not a string"
    if not row["output"].strip():
        return "empty 'output'"
    if not row["instruction"].strip():
        return "empty 'instruction'"
    if row.get("input") is not None and not isinstance(row["input"], str):
        return "field 'input' is not a string"
    return None


# ---------------------------------------------------------------------------- tokenizing


def tokenize(row: dict, tokenizer, max_seq_len: int) -> tuple[Example, bool]:
    """Prompt (masked) + response + EOS (trained), cut at `max_seq_len`; returns (example, cut)."""
    prompt_ids = tokenizer(alpaca_prompt(row), add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(row["output"], add_special_tokens=False)["input_ids"]
    response_ids = response_ids + [tokenizer.eos_token_id]
    input_ids = prompt_ids + response_ids
    labels = [IGNORE] * len(prompt_ids) + response_ids
    cut = len(input_ids) > max_seq_len
    return Example(input_ids[:max_seq_len], labels[:max_seq_len]), cut


def build(rows: list[dict], tokenizer, max_seq_len: int, stats: DataStats) -> list[Example]:
    """Tokenize rows; count truncations and drop examples left with no trained token."""
    examples = []
    for row in rows:
        example, cut = tokenize(row, tokenizer, max_seq_len)
        stats.truncated += cut
        # The first label is never predicted (nothing precedes it), so it does not count.
        if all(label == IGNORE for label in example.labels[1:]):
            stats.dropped_empty += 1
            continue
        stats.tokens += len(example.input_ids)
        stats.trained_tokens += sum(1 for label in example.labels[1:] if label != IGNORE)
        examples.append(example)
    return examples


def load_splits(data_cfg: DictConfig, tokenizer) -> tuple[Dataset, Dataset]:
    """The train and eval splits of a recipe's data, tokenized."""
    train_rows = read_rows(data_cfg.train, data_cfg.split)
    if not train_rows:
        raise ModeError(f"{data_cfg.train} holds no rows")
    train_rows, train_bad = check_rows(train_rows, data_cfg.train, data_cfg.on_bad_row)
    if data_cfg.eval:
        eval_rows = read_rows(data_cfg.eval, data_cfg.split)
        if not eval_rows:
            raise ModeError(f"{data_cfg.eval} holds no rows")
        eval_rows, eval_bad = check_rows(eval_rows, data_cfg.eval, data_cfg.on_bad_row)
    else:
        # Hold out a seeded random fraction of the training rows.
        order = list(range(len(train_rows)))
        random.Random(data_cfg.seed).shuffle(order)
        n_eval = max(1, round(len(order) * data_cfg.eval_fraction))
        held_out = set(order[:n_eval])
        eval_rows = [train_rows[i] for i in sorted(held_out)]
        train_rows = [row for i, row in enumerate(train_rows) if i not in held_out]
        eval_bad = []
    if data_cfg.max_train_examples:
        train_rows = train_rows[: data_cfg.max_train_examples]
    if data_cfg.max_eval_examples:
        eval_rows = eval_rows[: data_cfg.max_eval_examples]

    splits = []
    for name, rows, bad in (("train", train_rows, train_bad), ("eval", eval_rows, eval_bad)):
        stats = DataStats(rows=len(rows), skipped=bad)
        examples = build(rows, tokenizer, data_cfg.max_seq_len, stats)
        if not rows:
            raise ModeError(
                f"The {name} split is empty after removing {len(bad)} bad rows"
                + (
                    " and holding out the eval rows"
                    if name == "train" and not data_cfg.eval
                    else ""
                )
            )
        if not examples:
            raise ModeError(
                f"The {name} split has no example with a trained token ({stats.rows} rows, "
                f"{stats.dropped_empty} lost their whole response to data.max_seq_len="
                f"{data_cfg.max_seq_len}): raise data.max_seq_len or check the data"
            )
        splits.append(Dataset(examples=examples, stats=stats))
    return splits[0], splits[1]


# ---------------------------------------------------------------------------- batching


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch; padded positions are masked in attention and labels."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[i, :n] = torch.tensor(example.input_ids)
        labels[i, :n] = torch.tensor(example.labels)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def batches(examples: list[Example], batch_size: int, seed: int, epoch: int) -> list[list[Example]]:
    """Shuffled micro-batches for one epoch; the order depends only on (seed, epoch)."""
    order = list(range(len(examples)))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    return [
        [examples[i] for i in order[start : start + batch_size]]
        for start in range(0, len(order), batch_size)
    ]


def target_count(batch: dict[str, torch.Tensor]) -> int:
    """Number of predicted (unmasked) target tokens in a batch, after the one-token shift."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())
