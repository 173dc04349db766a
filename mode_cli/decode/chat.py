"""`mode chat`: a conversation with a finished run in the terminal, in the run's prompt format."""

from __future__ import annotations

import sys

from omegaconf import DictConfig

from mode_cli.console import console
from mode_cli.data.formats import chat_template, render_chat, user_prompt
from mode_cli.data.tokenizing import prompt_ids
from mode_cli.decode.generate import stream_reply
from mode_cli.models import families
from mode_cli.options import DecodingOptions


def format_prompt(text: str, cfg: DictConfig, tokenizer) -> str:
    """One user message in the form the run was trained on (its `data.format`)."""
    return user_prompt(text, cfg.data, tokenizer)


def chat_prompt(messages: list[dict], cfg: DictConfig, tokenizer) -> str:
    """A conversation (`role`/`content` messages, ending with the user's turn) as one prompt.

    `chat` runs render it with the run's chat template; `alpaca` runs get one Alpaca turn per
    exchange, earlier ones followed by their replies; `text` runs see the messages one per line.
    """
    data_format = cfg.data.format
    if data_format == "chat":
        template = chat_template(cfg.data, tokenizer)
        return render_chat(messages, template, tokenizer, True)
    if data_format == "text":
        return "\n".join(message["content"] for message in messages) + "\n"
    parts = []
    for message in messages:
        if message["role"] == "user":
            parts.append(format_prompt(message["content"], cfg, tokenizer))
        elif message["role"] == "assistant":
            parts.append(message["content"] + "\n\n")
    return "".join(parts)


def fit_context(messages: list[dict], length, limit: int | None) -> int:
    """Drop the oldest exchanges until `length(messages)` fits in `limit` tokens (the newest
    message always stays); returns how many messages were dropped."""
    dropped = 0
    while limit is not None and len(messages) > 1 and length(messages) > limit:
        # A user turn and the reply to it go together.
        count = 2 if len(messages) > 2 and messages[1]["role"] == "assistant" else 1
        del messages[:count]
        dropped += count
    return dropped


def context_limit(model, options: DecodingOptions) -> int | None:
    """Prompt tokens a reply of `max_new_tokens` leaves room for; None when the model sets none."""
    positions = getattr(families.base_of(model).config, "max_position_embeddings", None)
    return None if positions is None else max(1, positions - options.max_new_tokens)


def chat_loop(model, tokenizer, options: DecodingOptions) -> int:
    """`mode chat` on a loaded run (`mode_cli.load`): read a message per line, stream each reply;
    the conversation is kept."""
    interactive = sys.stdin.isatty()
    console.print("[dim]/exit (or Ctrl-D) ends the chat, /reset forgets it[/dim]")
    messages: list[dict] = []

    def length(turns: list[dict]) -> int:
        prompt = chat_prompt(turns, model.mode_config, tokenizer)
        return len(prompt_ids(tokenizer, prompt, model.mode_config.data.format))

    while True:
        try:
            line = input("> " if interactive else "")
        except (EOFError, KeyboardInterrupt):
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            messages.clear()
            console.print("[dim]conversation cleared[/dim]")
            continue
        messages.append({"role": "user", "content": text})
        dropped = fit_context(messages, length, context_limit(model, options))
        if dropped:
            console.print(f"[dim]{dropped} earliest messages left out to fit the context[/dim]")
        prompt = chat_prompt(messages, model.mode_config, tokenizer)
        try:
            reply = stream_reply(model, tokenizer, prompt, options)
        except KeyboardInterrupt:
            sys.stdout.write("\n")
            break
        messages.append({"role": "assistant", "content": reply})
    return 0
