"""A naive reference of the data path, the way `mode` built splits before the cache: every row
of a local file read into a Python list, checked, held out, mixed and capped as lists, tokenized
one row at a time into `Example`s and packed as a list. The optimised path (chunks, worker
processes, memory-mapped tokens, index arrays) must give exactly these examples."""

from __future__ import annotations

import json
import random
from pathlib import Path

from mode_cli.data.batching import join
from mode_cli.data.formats import Row, canonical, chat_template, row_identity
from mode_cli.data.selection import mix_counts
from mode_cli.data.sources import BadLine, not_text, plain, sources_of
from mode_cli.data.tokenizing import encode, predicted
from mode_cli.files import read_text, resolve_bundled


def read_rows(spec: str) -> list:
    path = resolve_bundled(spec) if spec.startswith("bundled:") else Path(spec)
    text = read_text(path)
    if path.suffix == ".json" or text.lstrip().startswith("["):
        return json.loads(text)
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                rows.append(BadLine(number, err.msg))
    return rows


def check_rows(spec: str, format: str, fields: dict) -> tuple[list[Row], list[str]]:
    from mode_cli.data.formats import row_problem

    good, bad = [], []
    for number, row in enumerate(read_rows(spec), start=1):
        if isinstance(row, BadLine):
            bad.append(f"{spec}, line {row.line}: not valid JSON ({row.error})")
        elif problem := row_problem(row, format, fields) or not_text(row, format, fields):
            bad.append(f"{spec}, row {number}: {problem}")
        else:
            good.append(Row(canonical(row, format, fields), format, spec, number))
    return good, bad


def unique(rows: list[Row], seen: set[bytes]) -> list[Row]:
    """The rows whose identity is not in `seen` (nor in an earlier row), adding theirs to it."""
    kept = []
    for row in rows:
        said = row_identity(row, row.format)
        if said not in seen:
            seen.add(said)
            kept.append(row)
    return kept


def hold_out(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held_out = set(order[: max(1, round(len(order) * fraction))])
    return (
        [row for i, row in enumerate(rows) if i not in held_out],
        [rows[i] for i in sorted(held_out)],
    )


def draw(rows: list, count: int, rng: random.Random) -> list:
    order = list(range(len(rows)))
    rng.shuffle(order)
    return [rows[order[i % len(order)]] for i in range(count)]


def interleave(groups: list[list]) -> list:
    out = []
    for i in range(max((len(g) for g in groups), default=0)):
        out.extend(g[i] for g in groups if i < len(g))
    return out


def select_rows(data_cfg) -> tuple[list[Row], list[Row]]:
    """Both splits' rows, the way the list-based code chose them (`data.dedup` included: the
    first row saying a thing is kept)."""
    sources = sources_of(data_cfg)
    mixing = bool(data_cfg.get("mix"))
    dedup = data_cfg.get("dedup", "none") == "exact"
    seed = data_cfg.seed
    seen: set[bytes] = set()
    train_groups, eval_groups = [], []
    for i, src in enumerate(sources):
        rows, _ = check_rows(src.train, src.format, src.fields)
        if dedup:
            rows = unique(rows, seen)
        if mixing and data_cfg.eval:
            held = []
        elif src.eval:
            held, _ = check_rows(src.eval, src.format, src.fields)
        else:
            rows, held = hold_out(rows, data_cfg.eval_fraction, seed + i)
        train_groups.append(rows)
        eval_groups.append(held)
    if mixing and data_cfg.eval:
        held, _ = check_rows(data_cfg.eval, data_cfg.format, plain(data_cfg.get("fields")))
        eval_groups = [held]
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
        random.Random(seed).shuffle(train)
    evaluation = interleave(eval_groups)
    if dedup:
        evaluation = unique(evaluation, set())
    if data_cfg.max_eval_examples:
        evaluation = evaluation[: data_cfg.max_eval_examples]
    return train, evaluation


def build(rows: list[Row], tokenizer, max_seq_len: int, template: str) -> tuple[list, dict]:
    counts = {"truncated": 0, "chunked": 0, "dropped_empty": 0, "tokens": 0, "trained_tokens": 0}
    examples = []
    for row in rows:
        encoded, cut = encode(row, tokenizer, max_seq_len, template)
        counts["truncated"] += cut
        counts["chunked"] += len(encoded) > 1
        for example in encoded:
            if predicted(example) == 0:
                counts["dropped_empty"] += 1
                continue
            counts["tokens"] += len(example.input_ids)
            counts["trained_tokens"] += predicted(example)
            examples.append(example)
    return examples, counts


def pack(examples: list, max_seq_len: int, seed: int) -> list:
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    packed, current, length = [], [], 0
    for i in order:
        example = examples[i]
        if current and length + len(example.input_ids) > max_seq_len:
            packed.append(join(current))
            current, length = [], 0
        current.append(example)
        length += len(example.input_ids)
    if current:
        packed.append(join(current))
    return packed


def splits(data_cfg, tokenizer) -> tuple[list, dict, list, dict]:
    """(train examples, train counts, eval examples, eval counts) by the naive path."""
    template = chat_template(data_cfg, tokenizer)
    train_rows, eval_rows = select_rows(data_cfg)
    train, train_counts = build(train_rows, tokenizer, data_cfg.max_seq_len, template)
    evaluation, eval_counts = build(eval_rows, tokenizer, data_cfg.max_seq_len, template)
    if data_cfg.get("packing", False):
        train = pack(train, data_cfg.max_seq_len, data_cfg.seed)
    return train, train_counts, evaluation, eval_counts
