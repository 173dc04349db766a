"""Sources checked and tokenized chunk by chunk, in worker processes, into cached arrays on disk.

- `scan_source`: every row of a source parsed and checked once (no tokenizer): the good rows'
  numbers and identities (`data.dedup`), the bad rows' messages (`data.on_bad_row`).
- `tokenize_source`: the rows a recipe chose, tokenized into flat arrays: token ids (uint16 when
  the vocabulary fits, else int32) and a trained mask (a label is its token or IGNORE: 1 byte a
  token); per example its start, trained-and-predicted count and a 16-byte digest; per row its
  examples and whether truncation cut it. Read back memory-mapped (`TokenStore`): an example
  costs memory when it is read, so a million rows are never a million Python objects.

Chunks (`sources.CHUNK_ROWS` rows) go to `data.num_proc` worker processes (by default the
available cores, at most `MAX_AUTO_PROCESSES`, for a source of `POOL_FROM_CHUNKS` chunks or more;
one process below that) and come back in order, at most two per worker in flight, so the
results are the same for any number of processes and memory stays bounded. Both results are
cache entries (`cache.py`) keyed by what changes them; with `data.cache=false` they are written
to a temporary folder that is removed once mapped.

Own worker processes rather than `datasets.map(num_proc=...)`: each row is checked and named by
its row number exactly as before, nothing is copied into datasets' own cache, and the arrays are
written straight into the format training reads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import closing
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path

import numpy as np

from mode_cli.data import cache
from mode_cli.data.formats import Row, canonical, row_identity
from mode_cli.data.sources import Chunk, Reader, RowSource, row_message, rows_of
from mode_cli.data.tokenizing import IGNORE, Example, encode_rows
from mode_cli.errors import ModeError

log = logging.getLogger(__name__)

POOL_FROM_CHUNKS = 10
MAX_AUTO_PROCESSES = 8
# Sources of at least this many rows are logged as they are scanned and tokenized.
LOG_FROM_ROWS = 10_000


# ---------------------------------------------------------------------------- worker side


@dataclass
class Job:
    """What a worker needs to scan or tokenize a source's chunks."""

    spec: str
    format: str
    fields: dict
    tokenizer: object = None
    template: str | None = None
    max_seq_len: int = 0


_job: Job | None = None


def start_worker(job: Job) -> None:
    global _job
    _job = job


@dataclass
class ScanPart:
    numbers: np.ndarray
    identities: bytes
    bad: list[str]
    rows: int


def scan_chunk(chunk: Chunk) -> ScanPart:
    """Check a chunk's rows: the good ones' numbers and identities, the bad ones' messages."""
    job = _job
    numbers, identities, bad = [], [], []
    for number, row in zip(chunk.numbers, rows_of(chunk, job.format, job.fields), strict=True):
        if (message := row_message(row, number, job.format, job.fields)) is not None:
            bad.append(message)
            continue
        numbers.append(number)
        identities.append(row_identity(canonical(row, job.format, job.fields), job.format))
    return ScanPart(
        np.asarray(numbers, dtype=np.int64), b"".join(identities), bad, len(chunk.numbers)
    )


@dataclass
class TokenPart:
    ids: np.ndarray  # int64, every example's tokens one after another
    trained: np.ndarray  # uint8
    lengths: np.ndarray  # int64 per example
    predicted: np.ndarray  # int32 per example
    digests: bytes  # 16 per example
    per_row: np.ndarray  # int64: examples of each row
    truncated: np.ndarray  # uint8 per row


def example_digest(ids: np.ndarray, trained: np.ndarray) -> bytes:
    """16 bytes that identify an example's tokens and labels (whatever dtype stores them)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(ids.astype("<i4").tobytes())
    digest.update(trained.astype(np.uint8).tobytes())
    return digest.digest()


def tokenize_chunk(chunk: Chunk) -> TokenPart:
    """Tokenize a chunk's (already checked) rows."""
    job = _job
    ids, trained, lengths, predicted, digests, per_row, truncated = [], [], [], [], [], [], []
    rows = [
        Row(canonical(row, job.format, job.fields), job.format, job.spec, number)
        for number, row in zip(chunk.numbers, rows_of(chunk, job.format, job.fields), strict=True)
    ]
    for encoded, cut in encode_rows(rows, job.tokenizer, job.max_seq_len, job.template):
        per_row.append(len(encoded))
        truncated.append(cut)
        for example in encoded:
            tokens = np.asarray(example.input_ids, dtype=np.int64)
            labels = np.asarray(example.labels, dtype=np.int64)
            mask = labels != IGNORE
            if not np.array_equal(labels[mask], tokens[mask]):
                raise AssertionError("a trained label differs from its token: not storable")
            ids.append(tokens)
            trained.append(mask.astype(np.uint8))
            lengths.append(len(tokens))
            predicted.append(int(mask[1:].sum()))
            digests.append(example_digest(tokens, mask))
    return TokenPart(
        np.concatenate(ids) if ids else np.zeros(0, np.int64),
        np.concatenate(trained) if trained else np.zeros(0, np.uint8),
        np.asarray(lengths, dtype=np.int64),
        np.asarray(predicted, dtype=np.int32),
        b"".join(digests),
        np.asarray(per_row, dtype=np.int64),
        np.asarray(truncated, dtype=np.uint8),
    )


# ---------------------------------------------------------------------------- in order, in parallel


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def worker_count(num_proc: int | None, chunks: Iterator[Chunk]) -> tuple[int, Iterator[Chunk]]:
    """How many processes work on these chunks (`data.num_proc`; None: the available cores, at
    most MAX_AUTO_PROCESSES, for POOL_FROM_CHUNKS chunks or more), and the chunks again."""
    if num_proc == 1:
        return 1, chunks
    head = list(islice(chunks, POOL_FROM_CHUNKS))
    again = chain(head, chunks)
    if num_proc is None:
        if len(head) < POOL_FROM_CHUNKS:
            return 1, again
        return max(1, min(MAX_AUTO_PROCESSES, available_cores())), again
    return (num_proc if len(head) > 1 else 1), again


def in_order(job: Job, work: Callable, chunks: Iterator[Chunk], processes: int) -> Iterator:
    """`work(chunk)` for every chunk, results in the chunks' order; in `processes` worker
    processes when more than one, with at most two chunks per worker in flight."""
    if processes <= 1:
        start_worker(job)
        for chunk in chunks:
            yield work(chunk)
        return
    # fork shares the tokenizer without pickling it and starts in milliseconds; elsewhere the
    # job travels pickled.
    method = "fork" if sys.platform == "linux" else "spawn"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*fork.*", category=DeprecationWarning)
        pool = ProcessPoolExecutor(
            processes,
            mp_context=multiprocessing.get_context(method),
            initializer=start_worker,
            initargs=(job,),
        )
    pending: deque = deque()
    try:
        for chunk in chunks:
            pending.append(pool.submit(work, chunk))
            while len(pending) >= 2 * processes:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except BrokenProcessPool:
        raise ModeError(
            f"a worker process reading {job.spec} died (out of memory?): lower data.num_proc"
        ) from None
    finally:
        for future in pending:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------------- scan


@dataclass
class Scan:
    """A source's rows, checked: `numbers[i]` is the row number of its i-th good row and
    `identities[i]` that row's 16-byte identity; `bad` the malformed rows' messages (`row 7:
    ...`, without the source); `rows` every row read, bad ones included."""

    source: RowSource
    key: str
    numbers: np.ndarray
    identities: np.ndarray
    bad: list[str]
    rows: int

    @property
    def count(self) -> int:
        return len(self.numbers)

    def messages(self) -> list[str]:
        return [f"{self.source.spec}, {message}" for message in self.bad]


def scan_source(reader: Reader, on_bad_row: str, use_cache: bool, num_proc: int | None) -> Scan:
    """Check every row of a source (from the cache when it holds this scan). With
    `on_bad_row=error` the first malformed row stops it, and nothing is written."""
    source = reader.source
    key = cache.entry_key(
        "scan",
        {"source": reader.digest(), "format": source.format, "fields": source.field_map},
    )
    folder = cache.find_entry("scan", key) if use_cache else None
    if folder is not None:
        meta = cache.read_meta(folder)
        scan = Scan(
            source,
            key,
            np.load(folder / "numbers.npy", mmap_mode="r"),
            np.load(folder / "identities.npy", mmap_mode="r"),
            meta["bad"],
            meta["rows"],
        )
    else:
        scan = scan_rows(reader, key, on_bad_row, num_proc)
    if scan.bad and on_bad_row == "error":
        raise ModeError(scan.messages()[0] + " (set data.on_bad_row=skip to drop such rows)")
    if folder is None and use_cache:
        cache.write_entry("scan", key, lambda staging: save_scan(scan, staging), keep=True)
    return scan


def scan_rows(reader: Reader, key: str, on_bad_row: str, num_proc: int | None) -> Scan:
    source = reader.source
    job = Job(source.spec, source.format, source.field_map)
    processes, chunks = worker_count(num_proc, reader.chunks())
    numbers, identities, bad, rows = [], [], [], 0
    started = time.perf_counter()
    with closing(in_order(job, scan_chunk, chunks, processes)) as parts:
        for part in parts:
            rows += part.rows
            numbers.append(part.numbers)
            identities.append(part.identities)
            bad += part.bad
            if bad and on_bad_row == "error":
                break  # the first bad row is the error: nothing more to read
    if not rows:
        raise ModeError(f"{source.spec} holds no rows")
    if rows >= LOG_FROM_ROWS:
        seconds = time.perf_counter() - started
        log.info(f"data: checked {rows:,} rows of {source.spec} in {seconds:.1f} s")
    return Scan(
        source,
        key,
        np.concatenate(numbers),
        np.frombuffer(b"".join(identities), dtype=np.uint8).reshape(-1, 16),
        bad,
        rows,
    )


def save_scan(scan: Scan, folder: Path) -> dict:
    np.save(folder / "numbers.npy", np.asarray(scan.numbers))
    np.save(folder / "identities.npy", np.asarray(scan.identities))
    return {"source": scan.source.spec, "rows": scan.rows, "bad": scan.bad}


# ---------------------------------------------------------------------------- tokens


class TokenStore:
    """The tokenized rows of one source, memory-mapped: examples are read on demand.

    `rows` are the good-row indices (positions in the source's `Scan`) that were tokenized, in
    order; the examples of `rows[j]` are `row_starts[j]` to `row_starts[j + 1]`.
    """

    def __init__(self, source: RowSource, folder: Path, cached: bool) -> None:
        meta = cache.read_meta(folder)
        self.source, self.format, self.cached = source, source.format, cached
        self.key = meta["key"]
        self.rows = load(folder / "rows.npy")
        self.row_starts = load(folder / "row_starts.npy")
        self.truncated = load(folder / "truncated.npy")
        self.starts = load(folder / "starts.npy")
        self.predicted = load(folder / "predicted.npy")
        self.digests = load(folder / "digests.npy")
        self.ids = flat(folder / "ids.bin", np.dtype(meta["dtype"]))
        self.trained = flat(folder / "trained.bin", np.dtype(np.uint8))
        self.tokens = meta["tokens"]

    def positions(self, rows: np.ndarray) -> np.ndarray:
        """Where these good-row indices are in `rows` (each must have been tokenized)."""
        found = np.searchsorted(self.rows, rows)
        if len(rows) and (found.max() >= len(self.rows) or (self.rows[found] != rows).any()):
            raise AssertionError(f"rows of {self.source.spec} were used but not tokenized")
        return found

    def length(self, examples: np.ndarray) -> np.ndarray:
        return np.asarray(self.starts[examples + 1] - self.starts[examples])

    def example(self, i: int) -> Example:
        start, end = int(self.starts[i]), int(self.starts[i + 1])
        ids = np.asarray(self.ids[start:end], dtype=np.int64)
        labels = np.where(np.asarray(self.trained[start:end], dtype=bool), ids, IGNORE)
        return Example(ids.tolist(), labels.tolist())


def load(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r")
    except ValueError:  # an empty array cannot be mapped
        return np.load(path)


def flat(path: Path, dtype: np.dtype) -> np.ndarray:
    if path.stat().st_size == 0:
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def tokenizer_digest(tokenizer) -> str:
    """What identifies a tokenizer's behaviour: its whole definition (a fast tokenizer's
    tokenizer.json, else its vocabulary files), its class and its special tokens."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        with tempfile.TemporaryDirectory() as folder:
            for name in sorted(tokenizer.save_vocabulary(folder)):
                digest.update(Path(name).read_bytes())
    described = {
        "class": type(tokenizer).__name__,
        "size": len(tokenizer),
        "special": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
        "eos": tokenizer.eos_token_id,
        "bos": tokenizer.bos_token_id,
    }
    digest.update(json.dumps(described, sort_keys=True).encode())
    return digest.hexdigest()


def tokenize_source(
    reader: Reader,
    scan: Scan,
    wanted: np.ndarray,
    tokenizer,
    template: str,
    max_seq_len: int,
    use_cache: bool,
    num_proc: int | None,
) -> TokenStore:
    """The tokens of a source's good rows `wanted` (sorted indices into the scan), from the cache
    when it holds them. When the recipe wants at least half of the rows, all are tokenized, so a
    change of split, cap or seed finds them cached."""
    source = reader.source
    everything = 2 * len(wanted) >= scan.count
    rows = np.arange(scan.count, dtype=np.int64) if everything else np.asarray(wanted, np.int64)
    common = {
        "scan": scan.key,
        "tokenizer": tokenizer_digest(tokenizer),
        "template": template if source.format == "chat" else None,
        "max_seq_len": max_seq_len,
    }
    all_key = cache.entry_key("tokens", {**common, "rows": "all"})
    key = (
        all_key
        if everything
        else cache.entry_key(
            "tokens", {**common, "rows": hashlib.sha256(rows.tobytes()).hexdigest()}
        )
    )
    if use_cache:
        folder = cache.find_entry("tokens", key) or cache.find_entry("tokens", all_key)
        if folder is not None:
            if len(rows) >= LOG_FROM_ROWS:
                log.info(f"data: tokens of {source.spec} from the cache ({folder})")
            return TokenStore(source, folder, cached=True)
    job = Job(source.spec, source.format, source.field_map, tokenizer, template, max_seq_len)
    dtype = np.dtype(np.uint16 if len(tokenizer) <= 2**16 else np.int32)

    def fill(folder: Path) -> dict:
        return write_tokens(reader, job, scan, rows, dtype, num_proc, folder)

    folder = cache.write_entry("tokens", key, fill, keep=use_cache)
    store = TokenStore(source, folder, cached=False)
    if not use_cache:
        shutil.rmtree(folder, ignore_errors=True)  # mapped already: the data stay until unmapped
    return store


def write_tokens(
    reader: Reader,
    job: Job,
    scan: Scan,
    rows: np.ndarray,
    dtype: np.dtype,
    num_proc: int | None,
    folder: Path,
) -> dict:
    """Tokenize `rows` chunk by chunk into the entry's files; what meta.json records."""
    numbers = np.asarray(scan.numbers[rows], dtype=np.int64)
    processes, chunks = worker_count(num_proc, reader.chunks(numbers))
    started = time.perf_counter()
    if len(rows) >= LOG_FROM_ROWS:
        log.info(
            f"data: tokenizing {len(rows):,} rows of {job.spec} in {processes} "
            f"process{'es' if processes > 1 else ''}"
        )
    lengths, predicted, digests, per_row, truncated = [], [], [], [], []
    done = 0
    with (folder / "ids.bin").open("wb") as ids, (folder / "trained.bin").open("wb") as trained:
        for part in in_order(job, tokenize_chunk, chunks, processes):
            ids.write(part.ids.astype(dtype).tobytes())
            trained.write(part.trained.tobytes())
            lengths.append(part.lengths)
            predicted.append(part.predicted)
            digests.append(part.digests)
            per_row.append(part.per_row)
            truncated.append(part.truncated)
            done += len(part.per_row)
    if done != len(rows):
        raise ModeError(f"{job.spec} changed while it was read: read it again")
    starts = np.zeros(sum(len(x) for x in lengths) + 1, dtype=np.int64)
    np.cumsum(np.concatenate(lengths), out=starts[1:])
    row_starts = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(np.concatenate(per_row), out=row_starts[1:])
    np.save(folder / "rows.npy", rows)
    np.save(folder / "row_starts.npy", row_starts)
    np.save(folder / "truncated.npy", np.concatenate(truncated))
    np.save(folder / "starts.npy", starts)
    np.save(folder / "predicted.npy", np.concatenate(predicted))
    np.save(
        folder / "digests.npy",
        np.frombuffer(b"".join(digests), dtype=np.uint8).reshape(-1, 16),
    )
    seconds = time.perf_counter() - started
    if len(rows) >= LOG_FROM_ROWS:
        log.info(
            f"data: tokenized {len(rows):,} rows of {job.spec} in {seconds:.1f} s "
            f"({len(rows) / max(seconds, 1e-9):,.0f} rows/s)"
        )
    return {
        "source": job.spec,
        "format": job.format,
        "rows": int(len(rows)),
        "examples": int(len(starts) - 1),
        "tokens": int(starts[-1]),
        "dtype": dtype.name,
        "seconds": round(seconds, 3),
        "processes": processes,
    }
