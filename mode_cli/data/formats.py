"""Data formats (`data.format`): what a row of each holds, how it is checked, and the prompt the
model sees before its response.

- `alpaca`: `instruction`, optional `input`, `output`. The prompt is the Alpaca template and is
  masked; the output and an EOS token are trained.
- `chat`: `messages`, a list of `{role, content}` turns (roles `system`, `user`, `assistant`;
  ShareGPT's `human` / `gpt` and Gemma's `model` are read as `user` / `assistant`), rendered with
  the tokenizer's chat template (`data.chat_template` overrides it; a tokenizer without one gets
  ChatML). Only the assistant turns are trained.
- `text`: `text`, plain documents for continued pretraining; every token is trained.

`data.fields` maps a format's field names to the file's column names (`{instruction: question}`,
`{messages: conversations, role: from, content: value}` for ShareGPT files, `{text: body}`).
"""

from __future__ import annotations

import hashlib
import json

from mode_cli.errors import ModeError

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


def alpaca_chat_template(bos_token: bool = False) -> str:
    """The Alpaca template as a Jinja chat template, for an exported model of an `alpaca` run:
    each user message becomes an Alpaca prompt, each earlier reply is followed by a blank line
    (what `mode chat` renders), system messages are left out. `bos_token` puts the tokenizer's BOS
    first, for a tokenizer that adds one to a prompt (a chat template carries its own special
    tokens)."""
    before, after = ALPACA_NO_INPUT.split("{instruction}")
    return (
        ("{{ bos_token }}" if bos_token else "")
        + "{% for message in messages %}"
        + "{% if message['role'] == 'user' %}"
        + f"{{{{ {json.dumps(before)} + message['content'] + {json.dumps(after)} }}}}"
        + "{% elif message['role'] == 'assistant' %}"
        + "{{ message['content'] + '\\n\\n' }}"
        + "{% endif %}{% endfor %}"
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


def row_identity(values: dict, format: str) -> bytes:
    """A 16-byte digest of what a row says in its format (`canonical` values; other columns and
    the file's field names do not count): two rows with the same one are exact duplicates.
    An Alpaca row's missing, null or empty input are one and the same prompt."""
    if format == "chat":
        said = [[m["role"], m["content"]] for m in values["messages"]]
    elif format == "text":
        said = values["text"]
    else:
        said = [values["instruction"], values.get("input") or "", values["output"]]
    text = json.dumps([format, said], ensure_ascii=False)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def run_formats(data_cfg) -> set[str]:
    """The prompt formats a run's rows come in: `data.format` and each `data.mix` source's."""
    mix = getattr(data_cfg, "mix", None) or ()
    return {data_cfg.format} | {source.format for source in mix if source.format}


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


def row_format(row: dict, data_cfg) -> str:
    """The format a row is rendered in: its own (a `data.mix` source's), else `data.format`."""
    return getattr(row, "format", None) or data_cfg.format


def row_prompt(row: dict, data_cfg, tokenizer) -> str:
    """Everything the model sees of a row before its response: the Alpaca template, or the chat
    up to its last assistant turn with the generation prompt. Text rows have no prompt."""
    format = row_format(row, data_cfg)
    if format == "text":
        raise ModeError("data.format=text has no prompt/response split: there is no row prompt")
    if format == "chat":
        messages = row["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        return render_chat(messages[:last], chat_template(data_cfg, tokenizer), tokenizer, True)
    return alpaca_prompt(row)
