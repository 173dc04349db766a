"""The train and eval splits of a recipe's data: rows selected (`sources.py`), tokenized
(`tokenizing.py`), counted, and the train split packed when `data.packing` is on (`batching.py`).

An example left with no trained token after truncation is dropped, counted and reported (a
warning on the `mode_cli` logger); above `data.max_dropped_fraction` of a split that is an error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from omegaconf import DictConfig

from mode_cli.data.batching import pack
from mode_cli.data.formats import CHATML_TEMPLATE, chat_template
from mode_cli.data.sources import select_rows
from mode_cli.data.tokenizing import Example, encode, predicted
from mode_cli.errors import ModeError

log = logging.getLogger(__name__)


@dataclass
class DataStats:
    """What happened to the rows of a split on their way to examples.

    rows: rows selected (after bad rows, the held-out split and the caps; with a mix, rows drawn,
    repeats included). examples: tokenized examples kept (a long text gives several). chunked:
    texts split into several examples. truncated: chat/alpaca examples cut at max_seq_len.
    dropped_empty: examples left with no trained token after truncation. packed: sequences the
    examples were packed into (0 when not packed). tokens / trained_tokens: of the kept examples,
    trained tokens counted as predictions (the first position of an example predicts nothing).
    sources: rows drawn per source (a mix). repeated: rows drawn more than once (a mix source
    sampled above its size).
    """

    rows: int = 0
    skipped: list[str] = field(default_factory=list)
    examples: int = 0
    chunked: int = 0
    truncated: int = 0
    dropped_empty: int = 0
    packed: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    sources: dict[str, int] = field(default_factory=dict)
    repeated: int = 0

    def describe(self, max_seq_len: int) -> str:
        """One line for `mode train --dry-run`."""
        parts = [
            f"{self.examples:,} examples from {self.rows:,} rows, {self.tokens:,} tokens "
            f"({self.trained_tokens:,} trained)",
            f"{self.truncated} truncated at data.max_seq_len={max_seq_len}, {self.dropped_empty} "
            f"dropped with no response left, {len(self.skipped)} bad rows skipped",
        ]
        if self.chunked:
            parts.append(f"{self.chunked} long texts split into chunks")
        if self.packed:
            fill = self.tokens / (self.packed * max_seq_len)
            parts.append(f"packed into {self.packed:,} sequences ({fill:.0%} full)")
        if len(self.sources) > 1:
            mix = ", ".join(f"{name}: {count:,}" for name, count in self.sources.items())
            parts.append(f"rows per source: {mix}")
            if self.repeated:
                parts.append(f"{self.repeated:,} rows repeated")
        return "; ".join(parts)


@dataclass
class Dataset:
    """A tokenized split and how it was made."""

    examples: list[Example]
    stats: DataStats


def build(
    rows: list[dict],
    tokenizer,
    max_seq_len: int,
    stats: DataStats,
    template: str = CHATML_TEMPLATE,
) -> list[Example]:
    """Tokenize rows; count truncations and drop examples left with no trained token."""
    examples = []
    for row in rows:
        encoded, cut = encode(row, tokenizer, max_seq_len, template)
        stats.truncated += cut
        stats.chunked += len(encoded) > 1
        for example in encoded:
            if predicted(example) == 0:
                stats.dropped_empty += 1
                continue
            stats.examples += 1
            stats.tokens += len(example.input_ids)
            stats.trained_tokens += predicted(example)
            examples.append(example)
    return examples


def load_splits(data_cfg: DictConfig, tokenizer) -> tuple[Dataset, Dataset]:
    """The train and eval splits of a recipe's data, tokenized (and the train split packed when
    `data.packing` is on)."""
    selection = select_rows(data_cfg)
    template = chat_template(data_cfg, tokenizer)
    max_seq_len = data_cfg.max_seq_len
    splits = []
    for name, rows, bad, per_source in (
        ("train", selection.train, selection.train_bad, selection.train_sources),
        ("eval", selection.eval, selection.eval_bad, selection.eval_sources),
    ):
        if not rows:
            raise ModeError(f"The {name} split is empty after removing {len(bad)} bad rows")
        stats = DataStats(rows=len(rows), skipped=bad, sources=per_source)
        if name == "train":
            stats.repeated = selection.repeated
        examples = build(rows, tokenizer, max_seq_len, stats, template)
        check_dropped(name, stats, data_cfg)
        if name == "train" and data_cfg.get("packing", False):
            examples = pack(examples, max_seq_len, data_cfg.seed)
            stats.packed = len(examples)
        splits.append(Dataset(examples=examples, stats=stats))
    return splits[0], splits[1]


def check_dropped(name: str, stats: DataStats, data_cfg: DictConfig) -> None:
    """Examples that lost every trained token to truncation: an error when none is left or more
    than `data.max_dropped_fraction` of the split went, else a warning."""
    dropped = stats.dropped_empty
    if not dropped:
        return
    total = dropped + stats.examples
    limit = data_cfg.get("max_dropped_fraction", 0.5)
    where = f"truncation at data.max_seq_len={data_cfg.max_seq_len}"
    if stats.examples == 0:
        raise ModeError(
            f"The {name} split has no example with a trained token ({stats.rows} rows, "
            f"{dropped} lost their whole response to {where}): raise data.max_seq_len or check "
            "the data"
        )
    if dropped / total > limit:
        raise ModeError(
            f"{dropped} of {total} {name} examples ({dropped / total:.0%}) lost their whole "
            f"response to {where}, more than data.max_dropped_fraction={limit}: raise "
            "data.max_seq_len, or data.max_dropped_fraction to train on the rest"
        )
    log.warning(
        f"data: {dropped} of {total} {name} examples lost their whole response to {where} and "
        "were dropped"
    )
