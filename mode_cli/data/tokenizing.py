"""From a row to token ids with the loss on the response only: `Example`s.

- alpaca: prompt (masked) + response + EOS (trained);
- chat: each assistant turn trains the tokens it adds to the conversation;
- text: every token trained, with an EOS after each document; a document longer than
  `data.max_seq_len` is split into chunks that overlap by one token, so every token but the first
  is predicted exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass

from mode_cli.data.formats import Row, alpaca_prompt, render_chat
from mode_cli.errors import ModeError

IGNORE = -100


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


def adds_special_tokens(format: str) -> bool:
    """The one rule for tokenizing text rendered in a `data.format`, in training and decoding alike.

    A rendered chat template carries its own special tokens (`add_special_tokens=False`); Alpaca
    prompts and text documents get the tokenizer's (its BOS, if it adds one). Deciding from the
    text instead (add unless it starts with the BOS token) gives a BOS-adding tokenizer's ChatML
    prompts a BOS that training never saw.
    """
    return format != "chat"


def prompt_ids(tokenizer, text: str, format: str) -> list[int]:
    """Token ids of text rendered in `format` (a prompt, a conversation, a document), tokenized
    as training tokenizes it: training, answer accuracy, `mode generate` and `mode chat` all
    tokenize through here."""
    return tokenizer(text, add_special_tokens=adds_special_tokens(format))["input_ids"]


def tokenize(row: dict, tokenizer, max_seq_len: int) -> tuple[Example, bool]:
    """An Alpaca row: prompt (masked) + response + EOS (trained), cut at `max_seq_len`;
    returns (example, cut)."""
    prompt = prompt_ids(tokenizer, alpaca_prompt(row), "alpaca")
    response_ids = tokenizer(row["output"], add_special_tokens=False)["input_ids"]
    return alpaca_example(prompt, response_ids, tokenizer.eos_token_id, max_seq_len)


def alpaca_example(
    prompt: list[int], response: list[int], eos: int, max_seq_len: int
) -> tuple[Example, bool]:
    """The Alpaca example of a tokenized prompt and response: the response and an EOS trained."""
    response = response + [eos]
    input_ids = prompt + response
    labels = [IGNORE] * len(prompt) + response
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
    input_ids = prompt_ids(tokenizer, text, "chat")
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
    ids = prompt_ids(tokenizer, text, "chat")
    return len(ids) if full_ids[: len(ids)] == ids else None


def tokenize_text(text: str, tokenizer, max_seq_len: int) -> list[Example]:
    """A document, every token trained, ended by EOS and split into chunks of `max_seq_len`
    that overlap by one token (the first position of a chunk is never predicted)."""
    return text_chunks(prompt_ids(tokenizer, text, "text") + [tokenizer.eos_token_id], max_seq_len)


def text_chunks(ids: list[int], max_seq_len: int) -> list[Example]:
    """A tokenized document (EOS included) in chunks of `max_seq_len` overlapping by one token."""
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
    format = row_format_of(row)
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


def encode_rows(
    rows: list[Row], tokenizer, max_seq_len: int, template: str
) -> list[tuple[list[Example], bool]]:
    """`encode` of each row, with one tokenizer call for all the Alpaca prompts, another for
    their responses, one for all text documents (the same ids, without a call's overhead per
    row); conversations go one by one."""
    alpaca = [i for i, row in enumerate(rows) if row_format_of(row) == "alpaca"]
    text = [i for i, row in enumerate(rows) if row_format_of(row) == "text"]
    out: list = [None] * len(rows)
    eos = tokenizer.eos_token_id
    if alpaca:
        prompts = [alpaca_prompt(rows[i]) for i in alpaca]
        special = adds_special_tokens("alpaca")
        prompts = tokenizer(prompts, add_special_tokens=special)["input_ids"]
        responses = [rows[i]["output"] for i in alpaca]
        responses = tokenizer(responses, add_special_tokens=False)["input_ids"]
        for i, prompt, response in zip(alpaca, prompts, responses, strict=True):
            example, cut = alpaca_example(prompt, response, eos, max_seq_len)
            out[i] = ([example], cut)
    if text:
        documents = [rows[i]["text"] for i in text]
        special = adds_special_tokens("text")
        documents = tokenizer(documents, add_special_tokens=special)["input_ids"]
        for i, ids in zip(text, documents, strict=True):
            out[i] = (text_chunks(ids + [eos], max_seq_len), False)
    for i, row in enumerate(rows):
        if out[i] is None:
            out[i] = encode(row, tokenizer, max_seq_len, template)
    return out


def row_format_of(row: dict) -> str:
    return getattr(row, "format", "alpaca")


def predicted(example: Example) -> int:
    """Trained tokens that are predicted: the label at position 0 has nothing before it."""
    return sum(1 for label in example.labels[1:] if label != IGNORE)


# A conversation to see how a chat template ends an assistant reply: what it renders between the
# reply and the next turn, and whether training's labels cover it.
PROBE = [
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "2 + 2 = 4."},
    {"role": "user", "content": "And 3 + 3?"},
]


@dataclass
class ReplyEnd:
    """How a trained reply of a format ends: `token`, the end-of-turn or EOS token that closes it
    (None when there is none), and whether training trains it. A model that never learned to emit
    it never stops generating."""

    format: str
    token: str | None
    trained: bool
    rendered: str = ""  # what the chat template renders after a reply

    @property
    def problem(self) -> str | None:
        if self.token is None:
            return (
                f"data.format={self.format}: no end-of-turn or EOS token of the tokenizer "
                f"follows an assistant reply (the chat template renders {self.rendered!r} after "
                "it, none of it a special token), so the model never learns to stop"
            )
        if not self.trained:
            return (
                f"data.format={self.format}: the end-of-turn token {self.token!r} that closes an "
                "assistant reply is not among the trained tokens (the chat template renders it "
                "with the next turn), so the model never learns to stop"
            )
        return None

    def describe(self) -> str:
        if self.problem:
            return self.problem
        return f"{self.format}: a reply ends with {self.token!r}, trained"


def reply_end(format: str, tokenizer, template: str) -> ReplyEnd:
    """How replies of `format` end in training examples: Alpaca responses and text documents get
    the tokenizer's EOS, trained; a chat reply ends with whatever special token the template
    renders first after it (found on a short conversation, `PROBE`)."""
    if format != "chat":
        eos = tokenizer.eos_token
        return ReplyEnd(format, eos, tokenizer.eos_token_id is not None)
    reply = PROBE[1]["content"]
    whole = render_chat(PROBE, template, tokenizer, False)
    upto = render_chat(PROBE[:2], template, tokenizer, False)
    end = upto.rfind(reply)
    if end < 0:
        raise ModeError("the chat template does not render an assistant reply as it was written")
    end += len(reply)
    next_turn = whole.find(PROBE[2]["content"], end)
    follows = whole[end : next_turn if next_turn >= 0 else len(whole)]
    added = getattr(tokenizer, "added_tokens_decoder", {})
    special = set(tokenizer.all_special_ids) | {i for i, t in added.items() if t.special}
    stops = [
        i
        for i in tokenizer(follows, add_special_tokens=False)["input_ids"]
        if i in special or i == tokenizer.eos_token_id
    ]
    if not stops:
        return ReplyEnd(format, None, False, follows)
    example, _ = tokenize_chat(PROBE[:2], tokenizer, 1 << 30, template)
    trained = stops[0] in {label for label in example.labels if label != IGNORE}
    return ReplyEnd(format, tokenizer.convert_ids_to_tokens(stops[0]), trained, follows)
