"""Where rows come from and which rows each split gets: files, bundled data, hub datasets; bad rows;
held-out eval rows; several sources mixed by weight (`data.mix`).

Rows come from a local .json/.jsonl file, a hub dataset id, or a file bundled with `mode`; a
malformed row is reported with its 1-based row number (`data.on_bad_row`).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mode_cli.data.formats import FORMAT_FIELDS, Row, canonical, row_problem
from mode_cli.errors import ModeError
from mode_cli.files import read_text, resolve_bundled

# `data.on_bad_row`: stop at the first malformed row, or drop such rows and count them.
BAD_ROW_POLICIES = ("error", "skip")


def read_rows(source: str, split: str = "train") -> list[dict | BadLine]:
    """All rows of a source: a local .json/.jsonl file, `bundled:<path>`, or a hub dataset id."""
    if source.startswith("bundled:"):
        return read_file(resolve_bundled(source))
    path = Path(source).expanduser()
    if path.is_dir():
        raise ModeError(f"{source} is a folder, not a data file: name a .json or .jsonl file")
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
    text = read_text(path)
    if path.suffix == ".json" or text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise ModeError(f"{path}: not valid JSON ({err})") from None
        except RecursionError:
            raise ModeError(f"{path}: not valid JSON (nested too deeply)") from None
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
        except RecursionError:
            rows.append(BadLine(number, "nested too deeply"))
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


def check_rows(
    rows: list[dict],
    source: str,
    on_bad_row: str,
    format: str = "alpaca",
    fields: dict | None = None,
) -> tuple[list[Row], list[str]]:
    """Keep well-formed rows, under the format's field names; a bad one is an error, or skipped
    and listed."""
    fields = dict(fields or {})
    good, bad = [], []
    for number, row in enumerate(rows, start=1):
        if isinstance(row, BadLine):
            message = f"{source}, line {row.line}: not valid JSON ({row.error})"
        elif problem := row_problem(row, format, fields) or not_text(row, format, fields):
            message = f"{source}, row {number}: {problem}"
        else:
            good.append(Row(canonical(row, format, fields), format, source, number))
            continue
        if on_bad_row == "error":
            raise ModeError(message + " (set data.on_bad_row=skip to drop such rows)")
        bad.append(message)
    return good, bad


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


@dataclass
class Source:
    """One data source with its format resolved (a `data.mix` entry, or `data` itself)."""

    train: str
    eval: str | None
    split: str
    weight: float
    format: str
    fields: dict


def sources_of(data_cfg: DictConfig) -> list[Source]:
    """`data.mix` entries (format and fields default to `data.format` / `data.fields`), or the
    single source `data.train`."""
    default_fields = plain(data_cfg.get("fields"))
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
        )
        for entry in mix
    ]


def plain(value) -> dict:
    """`data.fields` as a dict of the fields that are mapped."""
    if value is None:
        return {}
    mapping = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    return {name: column for name, column in mapping.items() if column is not None}


def mix_counts(sizes: list[int], weights: list[float], total: int) -> list[int]:
    """How many rows each source contributes to a mix of `total` rows: `total * w_i / sum(w)`,
    rounded by largest remainder so the counts add up to `total`."""
    shares = [total * w / sum(weights) for w in weights]
    counts = [int(share) for share in shares]
    by_remainder = sorted(range(len(shares)), key=lambda i: (counts[i] - shares[i], i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def draw(rows: list[Row], count: int, rng: random.Random) -> list[Row]:
    """`count` rows in a seeded order, going round the rows again when `count` exceeds them."""
    order = list(range(len(rows)))
    rng.shuffle(order)
    return [rows[order[i % len(order)]] for i in range(count)]


def interleave(groups: list[list[Row]]) -> list[Row]:
    """Round-robin over the groups, so a cap keeps every source represented."""
    out = []
    for i in range(max((len(g) for g in groups), default=0)):
        out.extend(g[i] for g in groups if i < len(g))
    return out


def read_checked(source: str, split: str, on_bad_row: str, format: str, fields: dict):
    rows = read_rows(source, split)
    if not rows:
        raise ModeError(f"{source} holds no rows")
    return check_rows(rows, source, on_bad_row, format, fields)


def hold_out(rows: list[Row], fraction: float, seed: int) -> tuple[list[Row], list[Row]]:
    """Split off a seeded random `fraction` of the rows (at least one) as eval rows; both parts
    keep the file order."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held_out = set(order[: max(1, round(len(order) * fraction))])
    return (
        [row for i, row in enumerate(rows) if i not in held_out],
        [rows[i] for i in sorted(held_out)],
    )


@dataclass
class Selection:
    """The rows each split is built from, before tokenizing."""

    train: list[Row]
    eval: list[Row]
    train_bad: list[str]
    eval_bad: list[str]
    train_sources: dict[str, int]
    eval_sources: dict[str, int]
    repeated: int = 0


def select_rows(data_cfg: DictConfig) -> Selection:
    """Read, check, hold out, mix and cap the rows of both splits.

    One source: the training rows in file order, capped at `data.max_train_examples`. A mix:
    `data.max_train_examples` rows (or, unset, as many as the sources hold together), each source
    contributing `mix_counts` of them, drawn in a seeded order (repeating rows when a source
    holds fewer), then shuffled together with `data.seed`. Eval rows: `data.eval` when set, else
    each source's `eval` or its held-out `data.eval_fraction`, interleaved; capped at
    `data.max_eval_examples`.
    """
    sources = sources_of(data_cfg)
    mixing = bool(data_cfg.get("mix"))
    seed = data_cfg.seed
    train_groups, eval_groups, train_bad, eval_bad = [], [], [], []
    for i, src in enumerate(sources):
        rows, bad = read_checked(src.train, src.split, data_cfg.on_bad_row, src.format, src.fields)
        train_bad += bad
        held_out = False
        if mixing and data_cfg.eval:
            held = []  # one eval source for the whole mix, read below
        elif src.eval:
            held, bad_eval = read_checked(
                src.eval, src.split, data_cfg.on_bad_row, src.format, src.fields
            )
            eval_bad += bad_eval
        else:
            rows, held = hold_out(rows, data_cfg.eval_fraction, seed + i)
            held_out = True
        if not rows:
            raise ModeError(
                f"The train split is empty after removing {len(bad)} bad rows"
                + (" and holding out the eval rows" if held_out else "")
                + (f" of {src.train}" if mixing else "")
            )
        train_groups.append(rows)
        eval_groups.append(held)
    if mixing and data_cfg.eval:
        held, eval_bad = read_checked(
            data_cfg.eval,
            data_cfg.split,
            data_cfg.on_bad_row,
            data_cfg.format,
            plain(data_cfg.get("fields")),
        )
        eval_groups = [held]

    repeated = 0
    if not mixing:
        train = train_groups[0]
        if data_cfg.max_train_examples:
            train = train[: data_cfg.max_train_examples]
    else:
        sizes = [len(rows) for rows in train_groups]
        total = data_cfg.max_train_examples or sum(sizes)
        counts = mix_counts(sizes, [s.weight for s in sources], total)
        train = []
        for i, (rows, count) in enumerate(zip(train_groups, counts, strict=True)):
            train += draw(rows, count, random.Random(seed * 1_000_003 + i))
            repeated += max(0, count - len(rows))
        random.Random(seed).shuffle(train)
    evaluation = interleave(eval_groups)
    if data_cfg.max_eval_examples:
        evaluation = evaluation[: data_cfg.max_eval_examples]

    def per_source(rows: list[Row], names: list[str]) -> dict[str, int]:
        if not mixing:
            return {}
        counts = dict.fromkeys(names, 0)
        for row in rows:
            counts[row.source] = counts.get(row.source, 0) + 1
        return counts

    return Selection(
        train,
        evaluation,
        train_bad,
        eval_bad,
        per_source(train, [s.train for s in sources]),
        per_source(evaluation, []),
        repeated,
    )


def eval_rows(data_cfg: DictConfig) -> list[Row]:
    """The rows the eval split is built from, in order (after field mapping and row checks), to
    read answers or prompts from. The same selection as `load_splits`."""
    return select_rows(data_cfg).eval
