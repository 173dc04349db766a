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
import signal
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


def start_worker_process(job: Job) -> None:
    """A worker process's start: Ctrl-C reaches the whole process group, and the command that
    started the workers is the one to stop them (after the chunks they are on)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    start_worker(job)


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
            initializer=start_worker_process,
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


# ---------------------------------------------------------------------------- arrays on disk


class Arrays:
    """An entry's arrays, appended part by part to raw files (`NAME.bin`), so the process that
    writes them never holds them whole; `spec()` is what meta.json records to map them back."""

    def __init__(self, folder: Path, dtypes: dict[str, str], widths: dict[str, int]) -> None:
        self.folder, self.dtypes, self.widths = folder, dtypes, widths
        self.files = {name: (folder / f"{name}.bin").open("wb") for name in dtypes}
        self.items = dict.fromkeys(dtypes, 0)

    def append(self, name: str, values) -> None:
        array = np.ascontiguousarray(values, dtype=self.dtypes[name])
        self.files[name].write(array.tobytes())
        self.items[name] += array.size

    def __enter__(self) -> Arrays:
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.files.values():
            handle.close()

    def spec(self) -> dict:
        return {
            name: {"dtype": self.dtypes[name], "width": self.widths.get(name, 1)}
            for name in self.dtypes
        }


def open_arrays(folder: Path, spec: dict) -> dict[str, np.ndarray]:
    """An entry's arrays, memory-mapped read-only: a page costs memory once it is read."""
    arrays = {}
    for name, form in spec.items():
        path, dtype, width = folder / f"{name}.bin", np.dtype(form["dtype"]), form["width"]
        if path.stat().st_size == 0:
            array = np.zeros(0, dtype)
        else:
            array = np.memmap(path, dtype=dtype, mode="r")
        arrays[name] = array.reshape(-1, width) if width > 1 else array
    return arrays


def entry(kind: str, key: str, fill: Callable[[Path], dict], use_cache: bool) -> Path:
    """A new entry, kept in the cache or (`data.cache=false`) in a temporary folder."""
    return cache.write_entry(kind, key, fill, keep=use_cache)


def opened(folder: Path, use_cache: bool) -> tuple[dict, dict[str, np.ndarray]]:
    """An entry's meta.json and arrays; a temporary entry's folder is removed once they are
    mapped (the data stay until unmapped)."""
    meta = cache.read_meta(folder)
    arrays = open_arrays(folder, meta["arrays"])
    if not use_cache:
        shutil.rmtree(folder, ignore_errors=True)
    return meta, arrays


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
    if folder is None:

        def fill(staging: Path) -> dict:
            return write_scan(reader, on_bad_row, num_proc, staging)

        folder = entry("scan", key, fill, use_cache)
    meta, arrays = opened(folder, use_cache)
    scan = Scan(source, key, arrays["numbers"], arrays["identities"], meta["bad"], meta["rows"])
    if scan.bad and on_bad_row == "error":
        raise ModeError(scan.messages()[0] + " (set data.on_bad_row=skip to drop such rows)")
    return scan


def write_scan(reader: Reader, on_bad_row: str, num_proc: int | None, folder: Path) -> dict:
    """Check every row into the entry's arrays; what meta.json records. The first bad row with
    `on_bad_row=error` stops it with the error, so the entry is not written."""
    source = reader.source
    job = Job(source.spec, source.format, source.field_map)
    processes, chunks = worker_count(num_proc, reader.chunks())
    bad, rows = [], 0
    started = time.perf_counter()
    with (
        Arrays(folder, {"numbers": "int64", "identities": "uint8"}, {"identities": 16}) as arrays,
        closing(in_order(job, scan_chunk, chunks, processes)) as parts,
    ):
        for part in parts:
            if part.bad and on_bad_row == "error":
                message = f"{source.spec}, {part.bad[0]}"
                raise ModeError(message + " (set data.on_bad_row=skip to drop such rows)")
            rows += part.rows
            arrays.append("numbers", part.numbers)
            arrays.append("identities", np.frombuffer(part.identities, dtype=np.uint8))
            bad += part.bad
    if not rows:
        raise ModeError(f"{source.spec} holds no rows")
    if rows >= LOG_FROM_ROWS:
        seconds = time.perf_counter() - started
        log.info(f"data: checked {rows:,} rows of {source.spec} in {seconds:.1f} s")
    return {"source": source.spec, "rows": rows, "bad": bad, "arrays": arrays.spec()}


# ---------------------------------------------------------------------------- tokens


class TokenStore:
    """The tokenized rows of one source, memory-mapped: examples are read on demand.

    `rows` are the good-row indices (positions in the source's `Scan`) that were tokenized, in
    order; the examples of `rows[j]` are `row_starts[j]` to `row_starts[j + 1]`, and example i's
    tokens `ids[starts[i]:starts[i + 1]]` (`trained` marks those trained).
    """

    def __init__(self, source: RowSource, folder: Path, cached: bool, use_cache: bool) -> None:
        meta, arrays = opened(folder, use_cache)
        self.source, self.format, self.cached = source, source.format, cached
        self.key, self.tokens = meta["key"], meta["tokens"]
        self.rows = arrays["rows"]
        self.row_starts = arrays["row_starts"]
        self.truncated = arrays["truncated"]
        self.starts = arrays["starts"]
        self.predicted = arrays["predicted"]
        self.digests = arrays["digests"]
        self.ids = arrays["ids"]
        self.trained = arrays["trained"]

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
    key = all_key
    if not everything:
        key = cache.entry_key("tokens", {**common, "rows": hashlib.sha256(rows).hexdigest()})
    if use_cache:
        folder = cache.find_entry("tokens", key) or cache.find_entry("tokens", all_key)
        if folder is not None:
            if len(rows) >= LOG_FROM_ROWS:
                log.info(f"data: tokens of {source.spec} from the cache ({folder})")
            return TokenStore(source, folder, cached=True, use_cache=True)
    job = Job(source.spec, source.format, source.field_map, tokenizer, template, max_seq_len)
    dtype = "uint16" if len(tokenizer) <= 2**16 else "int32"

    def fill(folder: Path) -> dict:
        return write_tokens(reader, job, scan, rows, dtype, num_proc, folder)

    folder = entry("tokens", key, fill, use_cache)
    return TokenStore(source, folder, cached=False, use_cache=use_cache)


def write_tokens(
    reader: Reader,
    job: Job,
    scan: Scan,
    rows: np.ndarray,
    dtype: str,
    num_proc: int | None,
    folder: Path,
) -> dict:
    """Tokenize `rows` chunk by chunk into the entry's arrays; what meta.json records."""
    numbers = np.asarray(scan.numbers[rows], dtype=np.int64)
    processes, chunks = worker_count(num_proc, reader.chunks(numbers))
    started = time.perf_counter()
    if len(rows) >= LOG_FROM_ROWS:
        log.info(
            f"data: tokenizing {len(rows):,} rows of {job.spec} in {processes} "
            f"process{'es' if processes > 1 else ''}"
        )
    dtypes = {
        "rows": "int64",
        "row_starts": "int64",
        "truncated": "uint8",
        "starts": "int64",
        "predicted": "int32",
        "digests": "uint8",
        "ids": dtype,
        "trained": "uint8",
    }
    examples = tokens = done = 0
    with (
        Arrays(folder, dtypes, {"digests": 16}) as arrays,
        closing(in_order(job, tokenize_chunk, chunks, processes)) as parts,
    ):
        arrays.append("rows", rows)
        arrays.append("row_starts", [0])
        arrays.append("starts", [0])
        for part in parts:
            arrays.append("ids", part.ids)
            arrays.append("trained", part.trained)
            arrays.append("starts", tokens + np.cumsum(part.lengths))
            arrays.append("predicted", part.predicted)
            arrays.append("digests", np.frombuffer(part.digests, dtype=np.uint8))
            arrays.append("row_starts", examples + np.cumsum(part.per_row))
            arrays.append("truncated", part.truncated)
            examples += len(part.lengths)
            tokens += int(part.lengths.sum())
            done += len(part.per_row)
    if done != len(rows):
        raise ModeError(f"{job.spec} changed while it was read: read it again")
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
        "examples": examples,
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "processes": processes,
        "arrays": arrays.spec(),
    }
