"""The train and eval splits of a recipe's data: each source checked (`store.scan_source`), rows
chosen for each split (`selection.py`), tokenized through the cache (`store.tokenize_source`),
counted, and the train split packed when `data.packing` is on (`batching.py`).

A split is a view over memory-mapped token arrays (`SplitExamples`): an example becomes Python
lists only when a batch reads it. An example left with no trained token after truncation is
dropped, counted and reported (a warning on the `mode_cli` logger); above
`data.max_dropped_fraction` of a split that is an error. A reply whose end-of-turn or EOS token is
not trained is a warning, or an error with `data.require_eos`.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from omegaconf import DictConfig

from mode_cli.data.batching import join, pack_groups
from mode_cli.data.formats import Row, chat_template
from mode_cli.data.selection import Rows, Selection, present, row_sources, select
from mode_cli.data.sources import Reader, RowSource, read_rows
from mode_cli.data.store import Scan, TokenStore, scan_source, tokenize_source
from mode_cli.data.tokenizing import Example, ReplyEnd, reply_end
from mode_cli.errors import ModeError

log = logging.getLogger(__name__)
# Bumped when `SplitExamples.identity` digests differently (1: `legacy_identity`, unnumbered).
IDENTITY_VERSION = 2


@dataclass
class DataStats:
    """What happened to the rows of a split on their way to examples.

    rows: rows selected (after bad rows, duplicates, the held-out split and the caps; with a mix,
    rows drawn, repeats included). examples: tokenized examples kept (a long text gives several).
    chunked: texts split into several examples. truncated: chat/alpaca examples cut at
    max_seq_len. dropped_empty: examples left with no trained token after truncation. packed:
    sequences the examples were packed into (0 when not packed). tokens / trained_tokens: of the
    kept examples, trained tokens counted as predictions (the first position of an example
    predicts nothing). sources: rows drawn per source (a mix). repeated: rows drawn more than once
    (a mix source sampled above its size). duplicates: rows dropped as exact duplicates
    (`dedup`: whether `data.dedup=exact` looked for them). cached: every token came from the
    cache (nothing was tokenized).
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
    duplicates: int = 0
    dedup: bool = False
    cached: bool = False

    def describe(self, max_seq_len: int) -> str:
        """One line for `mode train --dry-run` and the run's log."""
        parts = [
            f"{self.examples:,} examples from {self.rows:,} rows, {self.tokens:,} tokens "
            f"({self.trained_tokens:,} trained)",
            f"{self.truncated} truncated at data.max_seq_len={max_seq_len}, {self.dropped_empty} "
            f"dropped with no response left, {len(self.skipped)} bad rows skipped",
        ]
        if self.dedup:
            parts.append(f"{self.duplicates:,} exact duplicates dropped")
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


class SplitExamples(Sequence):
    """The examples of a split, read on demand from the sources' memory-mapped tokens: example i
    is example `index[i]` of source `source[i]`'s store. Packed (`packing`), item g is the
    sequence joining the examples `members[starts[g]:starts[g + 1]]`."""

    def __init__(
        self,
        stores: list[TokenStore | None],
        source: np.ndarray,
        index: np.ndarray,
        packing: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        self.stores, self.source, self.index, self.packing = stores, source, index, packing

    def __len__(self) -> int:
        return len(self.packing[1]) - 1 if self.packing else len(self.index)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        if self.packing is None:
            return self.example(i)
        members, starts = self.packing
        return join([self.example(int(j)) for j in members[starts[i] : starts[i + 1]]])

    def example(self, i: int) -> Example:
        """Example i before packing."""
        return self.stores[self.source[i]].example(int(self.index[i]))

    def per_store(self, values) -> np.ndarray:
        """`values(store, indices)` for every example before packing, in order."""
        out = None
        for s in present(self.source):
            mine = self.source == s
            got = np.asarray(values(self.stores[s], self.index[mine]))
            if out is None:
                out = np.zeros((len(self.index), *got.shape[1:]), dtype=got.dtype)
            out[mine] = got
        return out if out is not None else np.zeros(0, dtype=np.int64)

    def lengths(self) -> np.ndarray:
        """Every example's length, before packing."""
        return self.per_store(lambda store, idx: store.length(idx))

    def packed(self, max_seq_len: int, seed: int) -> SplitExamples:
        """These examples packed into sequences of at most `max_seq_len` tokens."""
        return SplitExamples(
            self.stores, self.source, self.index, pack_groups(self.lengths(), max_seq_len, seed)
        )

    def identity(self) -> dict:
        """The examples' count and a digest of their tokens, labels, order and packing: a
        resume must see the same. From each example's stored digest, not its tokens."""
        digest = hashlib.sha256(f"mode-data-{IDENTITY_VERSION}".encode())
        digests = self.per_store(lambda store, idx: store.digests[idx])
        if self.packing is None:
            digest.update(np.ascontiguousarray(digests).tobytes())
        else:
            members, starts = self.packing
            digest.update(np.ascontiguousarray(digests[members]).tobytes())
            digest.update(np.asarray(starts, dtype=np.int64).tobytes())
        return {
            "train_examples": len(self),
            "sha256": digest.hexdigest()[:16],
            "version": IDENTITY_VERSION,
        }

    def first_of_each_format(self) -> dict[str, Example]:
        """The first example (before packing) of each format in the split."""
        found = {}
        for s in present(self.source):
            format = self.stores[s].format
            if format not in found:
                found[format] = self.example(int(np.flatnonzero(self.source == s)[0]))
        return found


def legacy_identity(dataset: Dataset) -> dict:
    """The data identity checkpoints of mode 0.1 recorded: a digest of every example's tokens
    and labels (int64), in order; read through every example, so only to resume such a run."""
    digest = hashlib.sha256()
    for example in dataset.examples:
        digest.update(np.asarray(example.input_ids, dtype=np.int64).tobytes())
        digest.update(np.asarray(example.labels, dtype=np.int64).tobytes())
    return {"train_examples": len(dataset.examples), "sha256": digest.hexdigest()[:16]}


@dataclass
class Dataset:
    """A tokenized split and how it was made; `reply_ends`: how its formats' replies end."""

    examples: Sequence[Example]
    stats: DataStats
    reply_ends: list[ReplyEnd] = field(default_factory=list)


def scan_all(data_cfg: DictConfig) -> tuple[dict[RowSource, Reader], dict[RowSource, Scan]]:
    """Every source of the recipe opened and checked, in reading order."""
    use_cache, num_proc = data_cfg.get("cache", True), data_cfg.get("num_proc")
    readers = {source: Reader(source) for source in row_sources(data_cfg)}
    scans = {
        source: scan_source(reader, data_cfg.on_bad_row, use_cache, num_proc)
        for source, reader in readers.items()
    }
    return readers, scans


def load_splits(data_cfg: DictConfig, tokenizer) -> tuple[Dataset, Dataset]:
    """The train and eval splits of a recipe's data, tokenized (and the train split packed when
    `data.packing` is on)."""
    readers, scans = scan_all(data_cfg)
    selection = select(data_cfg, scans)
    splits = (
        ("train", selection.train, selection.train_bad, selection.train_sources),
        ("eval", selection.eval, selection.eval_bad, selection.eval_sources),
    )
    for name, rows, bad, _ in splits:
        if not len(rows):
            raise ModeError(f"The {name} split is empty after removing {len(bad)} bad rows")
    template = chat_template(data_cfg, tokenizer)
    ends = check_reply_ends(data_cfg, selection, tokenizer, template)
    stores: list[TokenStore | None] = []
    for i, source in enumerate(selection.sources):
        wanted = selection.rows_of(i)
        stores.append(
            tokenize_source(
                readers[source],
                scans[source],
                wanted,
                tokenizer,
                template,
                data_cfg.max_seq_len,
                data_cfg.get("cache", True),
                data_cfg.get("num_proc"),
            )
            if len(wanted)
            else None
        )
    datasets = []
    for name, rows, bad, per_source in splits:
        examples, stats = assemble(rows, stores)
        stats.skipped, stats.sources = bad, per_source
        stats.dedup = data_cfg.get("dedup", "none") == "exact"
        if name == "train":
            stats.repeated, stats.duplicates = selection.repeated, selection.train_duplicates
        else:
            stats.duplicates = selection.eval_duplicates
        check_dropped(name, stats, data_cfg)
        if name == "train" and data_cfg.get("packing", False):
            examples = examples.packed(data_cfg.max_seq_len, data_cfg.seed)
            stats.packed = len(examples)
        datasets.append(Dataset(examples, stats, ends if name == "train" else []))
    return datasets[0], datasets[1]


def assemble(rows: Rows, stores: list[TokenStore | None]) -> tuple[SplitExamples, DataStats]:
    """The examples of these rows, in order (a long text gives several), without those left
    with no trained token; and the counts."""
    n = len(rows)
    first, count = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    stats = DataStats(rows=n, cached=True)
    for s in present(rows.source):
        mine = rows.source == s
        store = stores[s]
        at = store.positions(rows.index[mine])
        first[mine] = store.row_starts[at]
        count[mine] = store.row_starts[at + 1] - store.row_starts[at]
        stats.truncated += int(np.asarray(store.truncated[at]).sum())
        stats.cached &= store.cached
    stats.chunked = int((count > 1).sum())
    offsets = np.repeat(np.cumsum(count) - count, count)
    index = np.arange(int(count.sum()), dtype=np.int64) - offsets + np.repeat(first, count)
    everything = SplitExamples(stores, np.repeat(rows.source, count), index)
    predicted = everything.per_store(lambda store, idx: store.predicted[idx]).astype(np.int64)
    keep = predicted > 0
    kept = SplitExamples(stores, everything.source[keep], index[keep])
    stats.dropped_empty = int((~keep).sum())
    stats.examples = len(kept)
    stats.tokens = int(kept.lengths().sum())
    stats.trained_tokens = int(predicted[keep].sum())
    return kept, stats


def check_reply_ends(
    data_cfg: DictConfig, selection: Selection, tokenizer, template: str
) -> list[ReplyEnd]:
    """How the training formats' replies end; one that does not end with a trained end-of-turn
    or EOS token is a warning, or an error with `data.require_eos`."""
    formats = sorted({selection.sources[s].format for s in present(selection.train.source)})
    ends = [reply_end(format, tokenizer, template) for format in formats]
    for end in ends:
        if end.problem is None:
            continue
        if data_cfg.get("require_eos", False):
            raise ModeError(f"{end.problem} (data.require_eos=true)")
        log.warning(f"data: {end.problem}; data.require_eos=true refuses such data")
    return ends


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


def select_rows(data_cfg: DictConfig) -> Selection:
    """The rows each split is built from (checked, deduplicated, held out, mixed and capped),
    without tokenizing: the same choice as `load_splits`."""
    _, scans = scan_all(data_cfg)
    return select(data_cfg, scans)


def rows_in_order(selection: Selection, rows: Rows) -> list[Row]:
    """The rows themselves, read again from their sources (only these rows), in order."""
    numbers = selection.row_numbers(rows)
    found: dict[tuple[int, int], Row] = {}
    for s in present(rows.source):
        wanted = np.unique(numbers[rows.source == s])
        for row in read_rows(selection.sources[s], wanted):
            found[(int(s), row.number)] = row
    return [found[(int(s), int(n))] for s, n in zip(rows.source, numbers, strict=True)]


def eval_rows(data_cfg: DictConfig, limit: int | None = None) -> list[Row]:
    """The first `limit` rows the eval split is built from (all without one), in order, under
    their format's field names, to read answers or prompts from: the same choice as
    `load_splits`."""
    selection = select_rows(data_cfg)
    rows = selection.eval if limit is None else selection.eval.take(slice(0, limit))
    return rows_in_order(selection, rows)
