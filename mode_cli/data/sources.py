"""Where rows come from: local files (.jsonl, .json, .parquet, .csv), files bundled with `mode`,
hub datasets (downloaded, or streamed with `data.streaming`); how a row is checked; the sources
of a recipe (`data.train`, or several mixed by `data.mix`).

A source is read in chunks of rows (`Reader.chunks`), never whole: a JSON-lines, Parquet or CSV
file of a million rows costs the memory of one chunk at a time (a .json list is parsed whole).
A malformed row is reported with its 1-based row number (a JSON-lines line that does not parse,
with its line number), as `data.on_bad_row` says.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import sys
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from mode_cli.data.formats import FORMAT_FIELDS, Row, canonical, row_problem
from mode_cli.errors import ModeError
from mode_cli.files import open_file, read_text, resolve_bundled

# `data.on_bad_row`: stop at the first malformed row, or drop such rows and count them.
BAD_ROW_POLICIES = ("error", "skip")
# Local files by suffix; any other existing file (.jsonl too) is JSON lines, or a JSON list when
# it starts with `[`.
FILE_KINDS = {".json": "json", ".parquet": "parquet", ".csv": "csv"}
# Rows handed to a worker at a time: large enough that process overhead vanishes, small enough
# that a chunk in flight per worker costs little memory.
CHUNK_ROWS = 1000


@dataclass(frozen=True)
class RowSource:
    """One place rows are read from (as the recipe names it) and how its rows are read."""

    spec: str
    split: str = "train"
    format: str = "alpaca"
    fields: tuple[tuple[str, str], ...] = ()
    streaming: bool = False

    @property
    def field_map(self) -> dict[str, str]:
        return dict(self.fields)


def row_source(
    spec: str, split: str, format: str, fields: dict, streaming: bool = False
) -> RowSource:
    return RowSource(spec, split, format, tuple(sorted(fields.items())), streaming)


@dataclass(frozen=True)
class BadLine:
    """A line of a JSON-lines file that does not parse: reported like any malformed row."""

    line: int
    error: str


@dataclass
class Chunk:
    """Rows read from a source, not yet parsed or checked: `numbers` are their 1-based row
    numbers; `payload` is JSON text per row (JSON lines, with `lines` their line numbers), a list
    of values, or an Arrow table. `text_cells`: a CSV's cells are all text, so a chat column holds
    its conversation as JSON."""

    numbers: list[int]
    payload: object
    lines: list[int] | None = None
    text_cells: bool = False


def rows_of(chunk: Chunk, format: str, fields: dict) -> list[object]:
    """The chunk's rows as Python values (a line that is not JSON becomes a BadLine)."""
    payload = chunk.payload
    if chunk.lines is not None:
        rows: list[object] = []
        for line, text in zip(chunk.lines, payload, strict=True):
            try:
                rows.append(json.loads(text))
            except json.JSONDecodeError as err:
                rows.append(BadLine(line, err.msg))
            except RecursionError:
                rows.append(BadLine(line, "nested too deeply"))
        return rows
    rows = list(payload) if isinstance(payload, list) else payload.to_pylist()
    if chunk.text_cells and format == "chat":
        key = fields.get("messages", "messages")
        for row in rows:
            if isinstance(row.get(key), str):
                # Left as text when it is not JSON: the row check says the field is not a list.
                with suppress(json.JSONDecodeError, RecursionError):
                    row[key] = json.loads(row[key])
    return rows


def row_message(row: object, number: int, format: str, fields: dict) -> str | None:
    """What is wrong with a row, as an error names it after its source (`row 7: missing field
    'output'`, `line 9: not valid JSON (...)`), or None for a well-formed row."""
    if isinstance(row, BadLine):
        return f"line {row.line}: not valid JSON ({row.error})"
    if problem := row_problem(row, format, fields) or not_text(row, format, fields):
        return f"row {number}: {problem}"
    return None


def not_text(row: dict, format: str, fields: dict) -> str | None:
    """A string the model reads that is not text: JSON's `\\ud800` escapes decode to unpaired
    UTF-16 surrogates, which no tokenizer accepts."""
    values = canonical(row, format, fields)
    for name in FORMAT_FIELDS[format]:
        for where, value in strings(values.get(name), f"field '{name}'"):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as err:
                return f"{where} holds an unpaired surrogate ({value[err.start]!r}), not text"
    return None


def strings(value: object, where: str) -> Iterator[tuple[str, str]]:
    """Every string in a field, with where it is (`field 'messages'[2]['content']`)."""
    if isinstance(value, str):
        yield where, value
    elif isinstance(value, dict | list):
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            yield from strings(item, f"{where}[{key!r}]")


# ---------------------------------------------------------------------------- reading


def offline() -> bool:
    """Whether the Hugging Face hub is off limits (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE)."""
    return any(
        os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")
        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


class Reader:
    """Reads one source in chunks: a local file, `bundled:<path>`, or a hub dataset id.

    `digest()` identifies the rows' content (a file's bytes, a downloaded dataset's fingerprint, a
    streamed dataset's revision): the tokenized cache is keyed by it. A hub dataset is opened once
    per reader.
    """

    def __init__(self, source: RowSource) -> None:
        self.source = source
        self.path: Path | None = None
        self._dataset = None
        spec = source.spec
        if spec.startswith("bundled:"):
            self.path = resolve_bundled(spec)
        else:
            path = Path(spec).expanduser()
            if path.is_dir():
                raise ModeError(
                    f"{spec} is a folder, not a data file: name a .jsonl, .json, .parquet or "
                    ".csv file"
                )
            if path.suffix in (*FILE_KINDS, ".jsonl") or path.exists():
                if not path.is_file():
                    raise ModeError(f"Data file not found: {spec}")
                self.path = path
        if self.path is not None:
            self.kind = FILE_KINDS.get(self.path.suffix) or self.sniff_json(self.path)
        elif source.streaming:
            if offline():
                raise ModeError(
                    f"data.streaming=true reads the hub dataset '{spec}' over the network, and "
                    "HF_HUB_OFFLINE / HF_DATASETS_OFFLINE forbid it: unset them, or set "
                    "data.streaming=false to read the dataset from the local cache"
                )
            self.kind = "stream"
        else:
            self.kind = "hub"

    @staticmethod
    def sniff_json(path: Path) -> str:
        """A .jsonl file, or one of another suffix: a JSON list when it starts with `[` (read
        as a .json file is), else JSON lines."""
        with open_file(path) as handle:
            start = handle.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
        return "json" if start.startswith(b"[") else "jsonl"

    # ------------------------------------------------------------ identity

    def digest(self) -> str:
        """What identifies the source's rows: any change to them changes it."""
        if self.path is not None:
            return "sha256:" + file_sha256(self.path)
        if self.kind == "hub":
            dataset = self.dataset()
            fingerprint = getattr(dataset, "_fingerprint", None)
            if fingerprint is None:
                files = [Path(f["filename"]) for f in dataset.cache_files]
                fingerprint = "+".join(file_sha256(f) for f in files)
            return f"hub:{self.source.spec}:{self.source.split}:{fingerprint}"
        return f"hub:{self.source.spec}:{self.source.split}:{hub_revision(self.source.spec)}"

    def dataset(self):
        """The hub dataset (downloaded into, or read from, datasets' cache; or a stream)."""
        if self._dataset is None:
            import datasets

            spec, split = self.source.spec, self.source.split
            try:
                self._dataset = datasets.load_dataset(
                    spec, split=split, **({"streaming": True} if self.kind == "stream" else {})
                )
            except Exception as err:  # datasets raises many types for a missing dataset
                raise ModeError(
                    f"Could not load dataset '{spec}' (split '{split}'): "
                    f"{str(err).splitlines()[0] if str(err) else type(err).__name__}"
                ) from None
        return self._dataset

    # ------------------------------------------------------------ rows

    def chunks(self, wanted: np.ndarray | None = None, size: int = CHUNK_ROWS) -> Iterator[Chunk]:
        """The source's rows in chunks of `size`, in order; only the row numbers in `wanted`
        (sorted) when given, and reading stops after the last of them."""
        reading = {
            "jsonl": self.jsonl_rows,
            "json": self.json_rows,
            "csv": self.csv_rows,
            "parquet": self.table_rows,
            "hub": self.table_rows,
            "stream": self.stream_rows,
        }[self.kind]
        return reading(Wanted(wanted), size)

    def jsonl_rows(self, wanted: Wanted, size: int) -> Iterator[Chunk]:
        """JSON lines, decoded here (a byte that is not UTF-8 stops the read with its line) and
        parsed by the worker; a blank line is not a row."""
        path = self.path
        chunk = Chunk([], [], lines=[])
        number = 0
        with open_file(path) as handle:
            for line_number, raw in enumerate(handle, start=1):
                if line_number == 1:
                    raw = first_line(path, raw)
                if not raw.strip():
                    continue
                number += 1
                if not wanted.takes(number):
                    if wanted.done:
                        break
                    continue
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise ModeError(
                        f"{path}: not UTF-8 text (line {line_number}: byte "
                        f"0x{raw[err.start]:02x}); save it as UTF-8"
                    ) from None
                chunk.numbers.append(number)
                chunk.payload.append(text)
                chunk.lines.append(line_number)
                if len(chunk.numbers) == size:
                    yield chunk
                    chunk = Chunk([], [], lines=[])
        if chunk.numbers:
            yield chunk

    def json_rows(self, wanted: Wanted, size: int) -> Iterator[Chunk]:
        """A JSON list: parsed whole (the format has no way to read a part of it)."""
        text = read_text(self.path)
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise ModeError(f"{self.path}: not valid JSON ({err})") from None
        except RecursionError:
            raise ModeError(f"{self.path}: not valid JSON (nested too deeply)") from None
        del text
        if not isinstance(rows, list):
            raise ModeError(f"{self.path}: expected a JSON list of objects")
        yield from in_chunks(enumerate(rows, start=1), wanted, size)

    def csv_rows(self, wanted: Wanted, size: int) -> Iterator[Chunk]:
        """A CSV file with a header row; every cell is text."""
        csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
        number = 0
        with open_file(self.path) as raw:
            handle = io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")
            reader = csv.DictReader(handle)
            try:
                rows = ((number := i, row) for i, row in enumerate(reader, start=1))
                yield from in_chunks(rows, wanted, size, text_cells=True)
            except UnicodeDecodeError:
                raise ModeError(
                    f"{self.path}: not UTF-8 text (after row {number}); save it as UTF-8"
                ) from None
            except csv.Error as err:
                raise ModeError(f"{self.path}, row {number + 1}: not valid CSV ({err})") from None

    def table_rows(self, wanted: Wanted, size: int) -> Iterator[Chunk]:
        """A Parquet file or a downloaded hub dataset: Arrow record batches."""
        if self.kind == "parquet":
            import pyarrow.parquet as pq

            try:
                batches = pq.ParquetFile(self.path).iter_batches(batch_size=size)
            except Exception as err:  # pyarrow's errors for a file that is not Parquet
                raise ModeError(f"{self.path}: not a Parquet file ({err})") from None
        else:
            batches = self.dataset().with_format("arrow").iter(batch_size=size)
        start = 0
        for batch in batches:
            numbers = range(start + 1, start + batch.num_rows + 1)
            start += batch.num_rows
            taken = [i for i, number in enumerate(numbers) if wanted.takes(number)]
            if taken:
                if len(taken) < batch.num_rows:
                    batch = batch.take(taken)
                yield Chunk([numbers[i] for i in taken], batch)
            if wanted.done:
                return

    def stream_rows(self, wanted: Wanted, size: int) -> Iterator[Chunk]:
        """A streamed hub dataset: rows as they arrive."""
        try:
            yield from in_chunks(enumerate(self.dataset(), start=1), wanted, size)
        except ModeError:
            raise
        except Exception as err:  # a network or format error in the middle of a stream
            raise ModeError(
                f"Streaming dataset '{self.source.spec}' failed: {str(err).splitlines()[0]}"
            ) from None


@dataclass
class Wanted:
    """Which row numbers a read keeps: all (None), or the sorted numbers given."""

    numbers: np.ndarray | None
    next: int = field(default=0)

    def takes(self, number: int) -> bool:
        if self.numbers is None:
            return True
        if self.next < len(self.numbers) and self.numbers[self.next] == number:
            self.next += 1
            return True
        return False

    @property
    def done(self) -> bool:
        return self.numbers is not None and self.next >= len(self.numbers)


def in_chunks(
    rows: Iterator[tuple[int, object]], wanted: Wanted, size: int, text_cells: bool = False
) -> Iterator[Chunk]:
    chunk = Chunk([], [], text_cells=text_cells)
    for number, row in rows:
        if wanted.takes(number):
            chunk.numbers.append(number)
            chunk.payload.append(row)
            if len(chunk.numbers) == size:
                yield chunk
                chunk = Chunk([], [], text_cells=text_cells)
        if wanted.done:
            break
    if chunk.numbers:
        yield chunk


def first_line(path: Path, raw: bytes) -> bytes:
    """A file's first line without a UTF-8 byte-order mark; UTF-16 is refused by name."""
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ModeError(
            f"{path}: not UTF-8 text (it starts with a UTF-16 byte-order mark); save it as UTF-8"
        )
    return raw.removeprefix(b"\xef\xbb\xbf")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open_file(path) as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def hub_revision(dataset_id: str) -> str:
    """The commit a streamed hub dataset is read at (it keys the cache: a new commit, new rows)."""
    from huggingface_hub import HfApi

    try:
        return HfApi().dataset_info(dataset_id).sha
    except Exception as err:  # huggingface_hub raises many types for a missing or unreachable repo
        raise ModeError(
            f"Could not reach the hub for dataset '{dataset_id}': "
            f"{str(err).splitlines()[0] if str(err) else type(err).__name__}"
        ) from None


def read_rows(source: RowSource, numbers: np.ndarray) -> list[Row]:
    """The rows with these (sorted) row numbers, checked and under their format's field names:
    for the answers and prompts of eval rows. Reading stops after the last one."""
    fields = source.field_map
    rows = []
    for chunk in Reader(source).chunks(np.asarray(numbers, dtype=np.int64)):
        for number, row in zip(chunk.numbers, rows_of(chunk, source.format, fields), strict=True):
            if (message := row_message(row, number, source.format, fields)) is not None:
                raise ModeError(f"{source.spec}, {message}")  # changed since the split was chosen
            values = canonical(row, source.format, fields)
            rows.append(Row(values, source.format, source.spec, number))
    return rows


# ---------------------------------------------------------------------------- a recipe's sources


@dataclass
class Source:
    """One data source with its format resolved (a `data.mix` entry, or `data` itself)."""

    train: str
    eval: str | None
    split: str
    weight: float
    format: str
    fields: dict
    streaming: bool = False

    def train_rows(self) -> RowSource:
        return row_source(self.train, self.split, self.format, self.fields, self.streaming)

    def eval_rows(self) -> RowSource | None:
        if not self.eval:
            return None
        return row_source(self.eval, self.split, self.format, self.fields, self.streaming)


def sources_of(data_cfg: DictConfig) -> list[Source]:
    """`data.mix` entries (format and fields default to `data.format` / `data.fields`), or the
    single source `data.train`."""
    default_fields = plain(data_cfg.get("fields"))
    streaming = bool(data_cfg.get("streaming", False))
    mix = data_cfg.get("mix") or []
    if not mix:
        if not data_cfg.train:
            raise ModeError("data.train is not set: name a data file or dataset (or use data.mix)")
        return [
            Source(
                data_cfg.train,
                data_cfg.eval,
                data_cfg.split,
                1.0,
                data_cfg.get("format", "alpaca"),
                default_fields,
                streaming,
            )
        ]
    return [
        Source(
            entry.train,
            entry.get("eval"),
            entry.get("split") or data_cfg.split,
            float(entry.get("weight", 1.0)),
            entry.get("format") or data_cfg.format,
            plain(entry.get("fields")) if entry.get("fields") is not None else default_fields,
            streaming,
        )
        for entry in mix
    ]


def plain(value) -> dict:
    """`data.fields` as a dict of the fields that are mapped."""
    if value is None:
        return {}
    mapping = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    return {name: column for name, column in mapping.items() if column is not None}
