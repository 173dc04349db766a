"""Which rows each split gets: exact duplicates dropped (`data.dedup`), held-out eval rows,
several sources mixed by weight (`data.mix`), the caps. Rows are index arrays into the sources'
scans (`store.Scan`), never the rows themselves, so choosing among a million rows costs a few
arrays of integers.

The choices are seeded `random.Random` shuffles of index ranges (`batching.shuffled`), which
depend only on the seed and the number of rows.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from omegaconf import DictConfig

from mode_cli.data.batching import shuffled
from mode_cli.data.sources import RowSource, plain, row_source, sources_of
from mode_cli.data.store import Scan
from mode_cli.errors import ModeError

# `data.dedup`: keep every row, or drop rows that say exactly what an earlier row says.
DEDUP_POLICIES = ("none", "exact")


def present(source: np.ndarray) -> np.ndarray:
    """The source numbers that occur in `source`, ascending (O(n): a split's rows come from a
    few sources, and sorting a million of them to find which is slow)."""
    return np.flatnonzero(np.bincount(source)) if len(source) else np.zeros(0, dtype=np.int64)


@dataclass
class Rows:
    """Rows of several sources in order: the `index`-th good row of source `source` (a position
    in `Selection.sources`)."""

    source: np.ndarray
    index: np.ndarray

    @classmethod
    def of(cls, source: int, index: np.ndarray) -> Rows:
        index = np.asarray(index, dtype=np.int64)
        return cls(np.full(len(index), source, dtype=np.int32), index)

    @classmethod
    def empty(cls) -> Rows:
        return cls.of(0, np.zeros(0, dtype=np.int64))

    @classmethod
    def concat(cls, parts: list[Rows]) -> Rows:
        if not parts:
            return cls.empty()
        return cls(
            np.concatenate([p.source for p in parts]), np.concatenate([p.index for p in parts])
        )

    def take(self, positions) -> Rows:
        return Rows(self.source[positions], self.index[positions])

    def __len__(self) -> int:
        return len(self.index)


@dataclass
class Selection:
    """The rows each split is built from, before tokenizing, and what happened to the others."""

    sources: list[RowSource]
    train: Rows
    eval: Rows
    train_bad: list[str]
    eval_bad: list[str]
    train_sources: dict[str, int]
    eval_sources: dict[str, int]
    repeated: int = 0
    train_duplicates: int = 0
    eval_duplicates: int = 0
    numbers: list[np.ndarray] = field(default_factory=list)  # each source's good-row numbers

    def row_numbers(self, rows: Rows) -> np.ndarray:
        """The row numbers (in their sources) of these rows."""
        numbers = np.zeros(len(rows), dtype=np.int64)
        for s in present(rows.source):
            mine = rows.source == s
            numbers[mine] = np.asarray(self.numbers[s])[rows.index[mine]]
        return numbers

    def rows_of(self, source: int) -> np.ndarray:
        """The sorted good-row indices of a source that either split uses."""
        used = np.zeros(len(self.numbers[source]), dtype=bool)
        for rows in (self.train, self.eval):
            used[rows.index[rows.source == source]] = True
        return np.flatnonzero(used)


def row_sources(data_cfg: DictConfig) -> list[RowSource]:
    """Every source the recipe reads, once each, in reading order: each training source and its
    eval source, then the mix's one eval source (`data.eval` with `data.mix`)."""
    found: list[RowSource] = []
    for entry in sources_of(data_cfg):
        for source in (entry.train_rows(), entry.eval_rows()):
            if source is not None and source not in found:
                found.append(source)
    if data_cfg.get("mix") and data_cfg.eval:
        source = mix_eval_source(data_cfg)
        if source not in found:
            found.append(source)
    return found


def mix_eval_source(data_cfg: DictConfig) -> RowSource:
    return row_source(
        data_cfg.eval,
        data_cfg.split,
        data_cfg.format,
        plain(data_cfg.get("fields")),
        bool(data_cfg.get("streaming", False)),
    )


def select(data_cfg: DictConfig, scans: Mapping[RowSource, Scan]) -> Selection:
    """Drop duplicates, hold out, mix and cap the rows of both splits.

    One source: the training rows in file order, capped at `data.max_train_examples`. A mix:
    `data.max_train_examples` rows (or, unset, as many as the sources hold together), each source
    contributing `mix_counts` of them, drawn in a seeded order (repeating rows when a source
    holds fewer), then shuffled together with `data.seed`. Eval rows: `data.eval` when set, else
    each source's `eval` or its held-out `data.eval_fraction`, interleaved; capped at
    `data.max_eval_examples`. With `data.dedup=exact` a training row that says what an earlier
    one says (in any training source) is dropped before the eval rows are held out, so no eval
    row repeats a training row of its source; eval rows are deduplicated among themselves.
    """
    sources = list(scans)
    number = {source: i for i, source in enumerate(sources)}
    entries = sources_of(data_cfg)
    mixing = bool(data_cfg.get("mix"))
    seed = data_cfg.seed
    dedup = data_cfg.get("dedup", "none") == "exact"
    train_scans = [scans[entry.train_rows()] for entry in entries]
    kept = [np.arange(scan.count, dtype=np.int64) for scan in train_scans]
    train_duplicates = 0
    if dedup:
        kept, train_duplicates = first_occurrences([scan.identities for scan in train_scans])

    train_groups, eval_groups, train_bad, eval_bad = [], [], [], []
    for i, (entry, scan) in enumerate(zip(entries, train_scans, strict=True)):
        train_bad += scan.messages()
        rows = kept[i]
        held_out = False
        if mixing and data_cfg.eval:
            held = Rows.empty()  # one eval source for the whole mix, below
        elif entry.eval:
            eval_scan = scans[entry.eval_rows()]
            held = Rows.of(number[eval_scan.source], np.arange(eval_scan.count))
            eval_bad += eval_scan.messages()
        else:
            keep, hold = hold_out(len(rows), data_cfg.eval_fraction, seed + i)
            rows, held = rows[keep], Rows.of(number[scan.source], rows[hold])
            held_out = True
        if not len(rows):
            raise ModeError(
                f"The train split is empty after removing {len(scan.bad)} bad rows"
                + (" and holding out the eval rows" if held_out else "")
                + (f" of {entry.train}" if mixing else "")
            )
        train_groups.append(Rows.of(number[scan.source], rows))
        eval_groups.append(held)
    if mixing and data_cfg.eval:
        eval_scan = scans[mix_eval_source(data_cfg)]
        eval_groups = [Rows.of(number[eval_scan.source], np.arange(eval_scan.count))]
        eval_bad = eval_scan.messages()

    repeated = 0
    if not mixing:
        train = train_groups[0]
        if data_cfg.max_train_examples:
            train = train.take(slice(0, data_cfg.max_train_examples))
    else:
        sizes = [len(rows) for rows in train_groups]
        total = data_cfg.max_train_examples or sum(sizes)
        counts = mix_counts(sizes, [entry.weight for entry in entries], total)
        drawn = []
        for i, (rows, count) in enumerate(zip(train_groups, counts, strict=True)):
            drawn.append(rows.take(draw(len(rows), count, random.Random(seed * 1_000_003 + i))))
            repeated += max(0, count - len(rows))
        train = Rows.concat(drawn)
        train = train.take(shuffled(len(train), random.Random(seed)))
    evaluation = interleave(eval_groups)
    eval_duplicates = 0
    if dedup:
        identities = [scans[source].identities for source in sources]
        evaluation, eval_duplicates = unique_rows(evaluation, identities)
    if data_cfg.max_eval_examples:
        evaluation = evaluation.take(slice(0, data_cfg.max_eval_examples))

    def per_source(rows: Rows, names: list[str]) -> dict[str, int]:
        if not mixing:
            return {}
        counts = dict.fromkeys(names, 0)
        for source, count in enumerate(np.bincount(rows.source, minlength=len(sources))):
            if count:
                name = sources[source].spec
                counts[name] = counts.get(name, 0) + int(count)
        return counts

    return Selection(
        sources,
        train,
        evaluation,
        train_bad,
        eval_bad,
        per_source(train, [entry.train for entry in entries]),
        per_source(evaluation, []),
        repeated,
        train_duplicates,
        eval_duplicates,
        [scans[source].numbers for source in sources],
    )


def first_occurrences(identities: list[np.ndarray]) -> tuple[list[np.ndarray], int]:
    """Per source, the positions of rows whose identity no earlier row (of it or of an earlier
    source) has; and how many rows were dropped."""
    together = np.concatenate([np.asarray(ids) for ids in identities]) if identities else None
    if together is None or not len(together):
        return [np.arange(len(ids), dtype=np.int64) for ids in identities], 0
    _, first = np.unique(together, axis=0, return_index=True)
    keep = np.zeros(len(together), dtype=bool)
    keep[first] = True
    kept, start = [], 0
    for ids in identities:
        kept.append(np.flatnonzero(keep[start : start + len(ids)]).astype(np.int64))
        start += len(ids)
    return kept, int(len(together) - len(first))


def unique_rows(rows: Rows, identities: list[np.ndarray]) -> tuple[Rows, int]:
    """The rows without those whose identity an earlier one has (order kept); and the count."""
    if not len(rows):
        return rows, 0
    width = identities[0].shape[1] if identities else 16
    said = np.zeros((len(rows), width), dtype=np.uint8)
    for source in present(rows.source):
        mine = rows.source == source
        said[mine] = np.asarray(identities[source])[rows.index[mine]]
    _, first = np.unique(said, axis=0, return_index=True)
    first.sort()
    return rows.take(first), len(rows) - len(first)


def mix_counts(sizes: list[int], weights: list[float], total: int) -> list[int]:
    """How many rows each source contributes to a mix of `total` rows: `total * w_i / sum(w)`,
    rounded by largest remainder so the counts add up to `total`."""
    shares = [total * w / sum(weights) for w in weights]
    counts = [int(share) for share in shares]
    by_remainder = sorted(range(len(shares)), key=lambda i: (counts[i] - shares[i], i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def draw(size: int, count: int, rng: random.Random) -> np.ndarray:
    """Positions of `count` rows out of `size`, in a seeded order, going round the rows again
    when `count` exceeds them."""
    order = shuffled(size, rng)
    return order[np.arange(count) % size]


def interleave(groups: list[Rows]) -> Rows:
    """Round-robin over the groups, so a cap keeps every source represented."""
    together = Rows.concat(groups)
    turn = np.concatenate([np.arange(len(g)) for g in groups]) if groups else np.zeros(0)
    group = np.concatenate([np.full(len(g), i) for i, g in enumerate(groups)]) if groups else turn
    return together.take(np.lexsort((group, turn)))


def hold_out(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split off a seeded random `fraction` of `n` rows (at least one) as eval rows: the
    positions kept for training and those held out, both in file order."""
    order = shuffled(n, random.Random(seed))
    held = np.zeros(n, dtype=bool)
    held[order[: max(1, round(n * fraction))]] = True
    return np.flatnonzero(~held), np.flatnonzero(held)
