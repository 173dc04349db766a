"""Training data: rows -> token ids with the loss on the response only, mixed, optionally packed.

Formats (`data.format`, one per source):

- `alpaca`: `instruction`, optional `input`, `output`. The prompt is the Alpaca template and is
  masked; the output and an EOS token are trained.
- `chat`: `messages`, a list of `{role, content}` turns (roles `system`, `user`, `assistant`;
  ShareGPT's `human` / `gpt` and Gemma's `model` are read as `user` / `assistant`),
  rendered with the tokenizer's chat template (`data.chat_template` overrides it; a tokenizer
  without one gets ChatML). Only the assistant turns are trained: for each one, the tokens it
  adds to the conversation after the generation prompt (its content and end-of-turn marker).
- `text`: `text`, plain documents for continued pretraining. Every token is trained, with an EOS
  after each document. A document longer than `data.max_seq_len` is split into chunks that
  overlap by one token, so every token but the first is predicted exactly once.

`data.fields` maps a format's field names to the file's column names (`{instruction: question}`,
`{messages: conversations, role: from, content: value}` for ShareGPT files, `{text: body}`). Rows come from a local
.json/.jsonl file, a hub dataset id, or a file bundled with `mode`; a malformed row is reported
with its 1-based row number. An example left with no trained token after truncation is dropped,
counted and reported; above `data.max_dropped_fraction` of a split that is an error.

`data.mix` trains on several sources at once, sampled by weight (see `mix_counts`), and
`data.packing` packs the training examples into full sequences (see `pack`).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from mode_cli.errors import ModeError
from mode_cli.model import resolve_bundled

IGNORE = -100

FORMATS = ("alpaca", "chat", "text")
# The names `data.fields` may map, per format.
FORMAT_FIELDS = {
    "alpaca": ("instruction", "input", "output"),
    "chat": ("messages", "role", "content"),
    "text": ("text",),
}
ROLES = ("system", "user", "assistant")
# Role names of other chat conventions: ShareGPT (`human`, `gpt`) and Gemma's `model`.
ROLE_ALIASES = {"human": "user", "gpt": "assistant", "model": "assistant"}


def role_of(message: dict, key: str) -> str | None:
    """A message's role under the standard names (system, user, assistant), or None if unknown."""
    role = message.get(key)
    role = ROLE_ALIASES.get(role, role) if isinstance(role, str) else None
    return role if role in ROLES else None


ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)

# ChatML, as SmolLM2 and Qwen use it, without a default system turn: the template a tokenizer
# that has none gets, and what `data.chat_template: chatml` selects.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def alpaca_prompt(row: dict) -> str:
    """The Alpaca template around a row's instruction (and input, when it has one)."""
    if row.get("input"):
        return ALPACA_WITH_INPUT.format(instruction=row["instruction"], input=row["input"])
    return ALPACA_NO_INPUT.format(instruction=row["instruction"])


class Row(dict):
    """A data row under its format's field names (after `data.fields`), with its provenance.

    Still a plain dict to read answers or other columns from; `format` says how it is rendered,
    `source` and `number` locate it for error messages.
    """

    def __init__(self, values: dict, format: str, source: str = "", number: int = 0) -> None:
        super().__init__(values)
        self.format = format
        self.source = source
        self.number = number


@dataclass
class Example:
    """One tokenized example: `labels` is -100 where nothing is trained, else the token id.

    `position_ids` is set on packed sequences: it restarts at 0 at every example packed in, which
    is what keeps attention and positions from crossing between them.
    """

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int] | None = None

    @property
    def trained_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE)


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
        elif (problem := row_problem(row, format, fields)) is not None:
            message = f"{source}, row {number}: {problem}"
        else:
            good.append(Row(canonical(row, format, fields), format, source, number))
            continue
        if on_bad_row == "error":
            raise ModeError(message + " (set data.on_bad_row=skip to drop such rows)")
        bad.append(message)
    return good, bad


def column(name: str, fields: dict) -> str:
    """How a field is named in messages: the file's column, and the mapping that chose it."""
    mapped = fields.get(name, name)
    return f"'{mapped}'" if mapped == name else f"'{mapped}' (data.fields.{name})"


def row_problem(row: object, format: str = "alpaca", fields: dict | None = None) -> str | None:
    """What is wrong with a row of the given format, or None."""
    fields = fields or {}
    if format == "chat":
        return chat_problem(row, fields)
    names = ("text",) if format == "text" else ("instruction", "output")
    if not isinstance(row, dict):
        expected = "text" if format == "text" else "instruction/input/output"
        return f"expected an object with {expected}, got {type(row).__name__}"
    for name in names:
        key = fields.get(name, name)
        if key not in row:
            return f"missing field {column(name, fields)}"
        if not isinstance(row[key], str):
            return f"field {column(name, fields)} is not a string"
    for name in reversed(names):  # an empty output is the likelier mistake: report it first
        if not row[fields.get(name, name)].strip():
            return f"empty {column(name, fields)}"
    if format == "alpaca":
        key = fields.get("input", "input")
        if row.get(key) is not None and not isinstance(row[key], str):
            return f"field {column('input', fields)} is not a string"
    return None


def chat_problem(row: object, fields: dict) -> str | None:
    if not isinstance(row, dict):
        return f"expected an object with messages, got {type(row).__name__}"
    key = fields.get("messages", "messages")
    if key not in row:
        return f"missing field {column('messages', fields)}"
    messages = row[key]
    if not isinstance(messages, list) or not messages:
        return f"field {column('messages', fields)} is not a non-empty list"
    role_key, content_key = fields.get("role", "role"), fields.get("content", "content")
    for i, message in enumerate(messages, start=1):
        if not isinstance(message, dict):
            return f"message {i} is not an object with role/content"
        if role_key not in message:
            return f"message {i} has no {column('role', fields)}"
        if role_of(message, role_key) is None:
            known = ", ".join((*ROLES, *ROLE_ALIASES))
            return f"message {i}: unknown role {message[role_key]!r} (expected {known})"
        if not isinstance(message.get(content_key), str):
            return f"message {i}: {column('content', fields)} is missing or not a string"
        if role_of(message, role_key) == "assistant" and not message[content_key].strip():
            return f"message {i}: empty assistant content"
    if not any(role_of(message, role_key) == "assistant" for message in messages):
        return "no assistant turn (nothing to train on)"
    return None


def canonical(row: dict, format: str, fields: dict) -> dict:
    """The row with its format's field names added (the file's other columns are kept)."""
    out = dict(row)
    if format == "chat":
        role_key, content_key = fields.get("role", "role"), fields.get("content", "content")
        out["messages"] = [
            {"role": role_of(m, role_key), "content": m[content_key]}
            for m in row[fields.get("messages", "messages")]
        ]
        return out
    for name in FORMAT_FIELDS[format]:
        key = fields.get(name, name)
        if key in row:
            out[name] = row[key]
    return out


# ---------------------------------------------------------------------------- prompts


def chat_template(data_cfg, tokenizer) -> str:
    """`data.chat_template` (`chatml` or a Jinja template), else the tokenizer's, else ChatML."""
    chosen = getattr(data_cfg, "chat_template", None) if data_cfg is not None else None
    if chosen == "chatml":
        return CHATML_TEMPLATE
    return chosen or getattr(tokenizer, "chat_template", None) or CHATML_TEMPLATE


def render_chat(messages: list[dict], template: str, tokenizer, generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages,
            chat_template=template,
            tokenize=False,
            add_generation_prompt=generation_prompt,
        )
    except Exception as err:  # jinja2 raises its own errors for templates that refuse a chat
        raise ModeError(f"the chat template refused this conversation: {err}") from None


def user_prompt(text: str, data_cfg, tokenizer) -> str:
    """The prompt a user's plain message becomes under the recipe's format, ready to generate."""
    format = data_cfg.format
    if format == "chat":
        messages = [{"role": "user", "content": text}]
        return render_chat(messages, chat_template(data_cfg, tokenizer), tokenizer, True)
    if format == "text":
        return text
    return ALPACA_NO_INPUT.format(instruction=text)


def row_prompt(row: dict, data_cfg, tokenizer) -> str:
    """Everything the model sees of a row before its response: the Alpaca template, or the chat
    up to its last assistant turn with the generation prompt. Text rows have no prompt."""
    format = getattr(row, "format", None) or data_cfg.format
    if format == "text":
        raise ModeError("data.format=text has no prompt/response split: there is no row prompt")
    if format == "chat":
        messages = row["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        return render_chat(messages[:last], chat_template(data_cfg, tokenizer), tokenizer, True)
    return alpaca_prompt(row)


# ---------------------------------------------------------------------------- tokenizing


def tokenize(row: dict, tokenizer, max_seq_len: int) -> tuple[Example, bool]:
    """An Alpaca row: prompt (masked) + response + EOS (trained), cut at `max_seq_len`;
    returns (example, cut)."""
    prompt_ids = tokenizer(alpaca_prompt(row), add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(row["output"], add_special_tokens=False)["input_ids"]
    response_ids = response_ids + [tokenizer.eos_token_id]
    input_ids = prompt_ids + response_ids
    labels = [IGNORE] * len(prompt_ids) + response_ids
    cut = len(input_ids) > max_seq_len
    return Example(input_ids[:max_seq_len], labels[:max_seq_len]), cut


def tokenize_chat(
    messages: list[dict], tokenizer, max_seq_len: int, template: str
) -> tuple[Example, bool]:
    """A conversation with only its assistant turns trained, cut at `max_seq_len`.

    Each assistant turn trains the tokens it adds to the conversation rendered up to it with the
    generation prompt. Templates are rendered incrementally; when the tokens of a shorter render
    are not a prefix of the whole conversation's (a merge across the boundary), the span is found
    by character offsets instead.
    """
    text = render_chat(messages, template, tokenizer, False)
    input_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    labels = [IGNORE] * len(input_ids)
    offsets = None
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_chat(messages[:i], template, tokenizer, True)
        after = render_chat(messages[: i + 1], template, tokenizer, False)
        if not (text.startswith(after) and after.startswith(before)):
            raise ModeError(
                "the chat template does not render a conversation as the renders of its "
                "beginnings followed by the new turns; set data.chat_template"
            )
        start = token_prefix_length(tokenizer, before, input_ids)
        end = token_prefix_length(tokenizer, after, input_ids)
        if start is None or end is None:
            # Label the tokens that overlap the turn's characters.
            offsets = offsets or character_offsets(tokenizer, text)
            span = [j for j, (a, b) in enumerate(offsets) if a < len(after) and b > len(before)]
            start, end = (span[0], span[-1] + 1) if span else (0, 0)
        labels[start:end] = input_ids[start:end]
    cut = len(input_ids) > max_seq_len
    return Example(input_ids[:max_seq_len], labels[:max_seq_len]), cut


def character_offsets(tokenizer, text: str) -> list[tuple[int, int]]:
    try:
        return tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)[
            "offset_mapping"
        ]
    except NotImplementedError:  # slow (Python) tokenizers have no offsets
        raise ModeError(
            "the chat template's turns do not tokenize separately and this tokenizer gives no "
            "character offsets to find them: use a fast tokenizer or set data.chat_template"
        ) from None


def token_prefix_length(tokenizer, text: str, full_ids: list[int]) -> int | None:
    """len(ids of `text`) when they are a prefix of `full_ids`, else None."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return len(ids) if full_ids[: len(ids)] == ids else None


def tokenize_text(text: str, tokenizer, max_seq_len: int) -> list[Example]:
    """A document, every token trained, ended by EOS and split into chunks of `max_seq_len`
    that overlap by one token (the first position of a chunk is never predicted)."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id]
    stride = max(1, max_seq_len - 1)
    chunks = []
    start = 0
    while True:
        chunk = ids[start : start + max_seq_len]
        chunks.append(Example(chunk, list(chunk)))
        if start + max_seq_len >= len(ids):
            return chunks
        start += stride


def encode(row: dict, tokenizer, max_seq_len: int, template: str) -> tuple[list[Example], bool]:
    """The examples of one row under its format, and whether truncation cut it."""
    format = getattr(row, "format", "alpaca")
    if format == "text":
        return tokenize_text(row["text"], tokenizer, max_seq_len), False
    try:
        if format == "chat":
            example, cut = tokenize_chat(row["messages"], tokenizer, max_seq_len, template)
        else:
            example, cut = tokenize(row, tokenizer, max_seq_len)
    except ModeError as err:
        where = f"{row.source}, row {row.number}: " if isinstance(row, Row) else ""
        raise ModeError(f"{where}{err}") from None
    return [example], cut


def predicted(example: Example) -> int:
    """Trained tokens that are predicted: the label at position 0 has nothing before it."""
    return sum(1 for label in example.labels[1:] if label != IGNORE)


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


# ---------------------------------------------------------------------------- sources and mixing


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


# ---------------------------------------------------------------------------- splits


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
    warn(
        f"{dropped} of {total} {name} examples lost their whole response to {where} and were "
        "dropped"
    )


def warn(message: str) -> None:
    from rich.console import Console

    Console(stderr=True).print(f"[yellow]data:[/yellow] {message}")


# ---------------------------------------------------------------------------- packing


def pack(examples: list[Example], max_seq_len: int, seed: int) -> list[Example]:
    """Pack examples greedily, in a seeded order, into sequences of at most `max_seq_len`.

    Each packed sequence's `position_ids` restart at 0 at every example, which the decoder turns
    into a block-diagonal causal mask (no attention across examples), and the first label of every
    example is masked, so no example is trained to predict the start of the next one.
    """
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    packed: list[Example] = []
    current: list[Example] = []
    length = 0
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


def join(examples: list[Example]) -> Example:
    """One packed sequence from examples placed one after another."""
    input_ids, labels, position_ids = [], [], []
    for example in examples:
        input_ids += example.input_ids
        labels += [IGNORE, *example.labels[1:]]
        position_ids += range(len(example.input_ids))
    return Example(input_ids, labels, position_ids)


# ---------------------------------------------------------------------------- batching


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch; padded positions are masked in attention and labels.

    Packed sequences add `position_ids`; their padding gets positions of its own (0, 1, ...), so
    it is a separate block the real tokens never attend to, and the model is run with these
    position ids instead of the attention mask (`model.hidden_states`).
    """
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    packed = any(e.position_ids is not None for e in examples)
    position_ids = torch.zeros((len(examples), width), dtype=torch.long)
    for i, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[i, :n] = torch.tensor(example.input_ids)
        labels[i, :n] = torch.tensor(example.labels)
        attention_mask[i, :n] = 1
        if packed:
            own = example.position_ids if example.position_ids is not None else range(n)
            position_ids[i, :n] = torch.tensor(list(own))
            position_ids[i, n:] = torch.arange(width - n)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if packed:
        batch["position_ids"] = position_ids
    return batch


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
