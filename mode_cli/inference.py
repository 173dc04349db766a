"""Decoding with the MoDE ensemble head (METHOD.md 7): forward, `generate()`, KV cache, streaming.

The ensemble's logits are `f(W . sum_l w_l Norm_l(h_l))`, and `W` is the model's own LM head. So
the model decodes from the ensemble when its LM head is replaced by a module that mixes first:

    attach(model, head)                       # forward hooks on the selected layers + EnsembleHead
    model.generate(**inputs)                  # every step decodes from the ensemble
    with use_head(model, "final"): ...        # the model's own final layer, same object

During each forward of the CausalLM, hooks on the selected decoder layers keep their outputs (for
the positions of that call only, so the KV cache works unchanged); the `EnsembleHead` in place of
the LM head receives the final-normed state of layer N, applies the trained norms to the kept
states, routes, mixes, and projects once with the original head. What the model does after its
head (Gemma 2's soft-capping) then acts on the mixed logits, as in training. Outside a forward of
the whole model (the decoder alone, or the head called directly, as the per-layer report does),
the replaced head is the plain LM head.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from mode_cli import data as data_mod
from mode_cli import model as model_mod
from mode_cli.errors import ModeError
from mode_cli.head import MoDEHead, has_ensemble

HEAD_KINDS = ("ensemble", "final")


class EnsembleHead(nn.Module):
    """Stands in for a model's LM head: the MoDE ensemble during a model forward, else the head.

    Args:
        lm_head: the model's original output projection (kept, and used for every projection).
        head: the trained MoDE head (norms and router).
        kind: `ensemble` or `final` (the original head's prediction from layer N alone).
    """

    def __init__(self, lm_head: nn.Module, head: MoDEHead, kind: str = "ensemble") -> None:
        super().__init__()
        self.lm_head = lm_head
        self.head = head
        self.kind = kind
        self.captured: dict[int, torch.Tensor] = {}
        self.in_forward = False
        self.logits_to_keep: int | torch.Tensor = 0
        self.hooks: list = []
        self.original_forward = None  # the instance's own `forward` attribute before attach

    @property
    def mixing(self) -> bool:
        return self.in_forward and self.kind == "ensemble"

    def forward(self, final_state: torch.Tensor) -> torch.Tensor:
        if not self.mixing:
            return self.lm_head(final_state)
        from transformers.modeling_utils import slice_logits_to_keep

        # The model sliced its last state to the positions it wants logits for; slice the
        # captured states the same way so every layer lines up token by token.
        states = {
            layer: slice_logits_to_keep(self.captured.pop(layer), self.logits_to_keep)
            for layer in self.head.layers[:-1]
        }
        states[self.head.num_layers] = final_state
        normed, weights = self.head(states)
        mixed = MoDEHead.mix(normed, weights)
        return self.lm_head(mixed.to(self.lm_head.weight.dtype))


def ensemble_of(model: nn.Module) -> EnsembleHead | None:
    """The EnsembleHead attached to `model`, or None."""
    head = model_mod.lm_head(model)
    return head if isinstance(head, EnsembleHead) else None


# Why a recipe's model has no ensemble to decode from, by loss.
NO_ENSEMBLE = {
    "final-only": "has no MoDE head (trained with loss=final-only): use head=final to decode "
    "from its final layer",
    "layerwise": "has per-layer norms but no router (loss=layerwise), so no ensemble: use "
    "head=final",
}


def check_head_kind(kind: str, head: MoDEHead | None, where: str = "this model") -> None:
    """A clear error for a head kind the model cannot decode with."""
    check_kind(kind)
    if kind == "ensemble" and not has_ensemble(head):
        raise ModeError(f"{where} {NO_ENSEMBLE['final-only' if head is None else 'layerwise']}")


def check_recipe_head_kind(kind: str, loss: str, where: str = "this model") -> None:
    """The same check from the recipe's loss alone, before any weights load."""
    check_kind(kind)
    if kind == "ensemble" and loss in NO_ENSEMBLE:
        raise ModeError(f"{where} {NO_ENSEMBLE[loss]}")


def check_kind(kind: str) -> None:
    if kind not in HEAD_KINDS:
        raise ModeError(f"head={kind!r}: expected one of {', '.join(HEAD_KINDS)}")


def attach(model: nn.Module, head: MoDEHead, kind: str = "ensemble") -> EnsembleHead:
    """Make `model` decode from the MoDE ensemble (or its final layer, `kind="final"`).

    Works on a plain transformers CausalLM or a peft model around one; idempotent. Undo with
    `detach`. Saving the model while attached would save the wrapper: detach first.
    """
    check_head_kind(kind, head)
    existing = ensemble_of(model)
    if existing is not None:
        if existing.head is not head:
            raise ValueError("another MoDE head is already attached to this model; detach it first")
        existing.kind = kind
        return existing
    base = model_mod.base_of(model)
    family = model_mod.family_of(base)
    if head.num_layers != model_mod.num_layers(model):
        raise ModeError(
            f"the MoDE head was trained on a {head.num_layers}-layer model; this model has "
            f"{model_mod.num_layers(model)} layers"
        )
    ensemble = EnsembleHead(model_mod.lm_head(model), head, kind)
    layers = model_mod.get_attr(base, family.layers)

    def keep(layer: int):
        def hook(module, args, output):
            if ensemble.mixing:
                ensemble.captured[layer] = output[0] if isinstance(output, tuple) else output

        return hook

    ensemble.hooks = [
        layers[layer - 1].register_forward_hook(keep(layer)) for layer in head.layers[:-1]
    ]

    # Wrap the CausalLM's forward on the instance: peft calls `model.forward(...)` directly,
    # which no module hook would see. `functools.wraps` keeps the signature `generate()` inspects.
    original = base.__dict__.get("forward")
    forward = base.forward

    @functools.wraps(forward)
    def forward_with_ensemble(*args, **kwargs):
        ensemble.captured.clear()
        ensemble.in_forward = True
        ensemble.logits_to_keep = kwargs.get("logits_to_keep", 0)
        try:
            return forward(*args, **kwargs)
        finally:
            ensemble.in_forward = False
            ensemble.captured.clear()

    ensemble.original_forward = original
    base.forward = forward_with_ensemble
    parent, _, name = family.lm_head.rpartition(".")
    setattr(model_mod.get_attr(base, parent) if parent else base, name, ensemble)
    return ensemble


def detach(model: nn.Module) -> None:
    """Put the original LM head and forward back (nothing to do when no head is attached)."""
    ensemble = ensemble_of(model)
    if ensemble is None:
        return
    base = model_mod.base_of(model)
    family = model_mod.family_of(base)
    for hook in ensemble.hooks:
        hook.remove()
    if ensemble.original_forward is None:
        del base.forward
    else:
        base.forward = ensemble.original_forward
    parent, _, name = family.lm_head.rpartition(".")
    setattr(model_mod.get_attr(base, parent) if parent else base, name, ensemble.lm_head)


@contextmanager
def use_head(model: nn.Module, kind: str, head: MoDEHead | None = None) -> Iterator[nn.Module]:
    """Decode from `kind` (`ensemble` or `final`) inside the block; the model is as before after.

    `head` is needed only when no MoDE head is attached yet (a model from `mode_cli.load` has
    one attached when its run trained one).
    """
    attached = ensemble_of(model)
    if attached is not None:
        check_head_kind(kind, attached.head)
        before, attached.kind = attached.kind, kind
        try:
            yield model
        finally:
            attached.kind = before
        return
    check_head_kind(kind, head)
    if kind == "final":
        yield model
        return
    attach(model, head, kind)
    try:
        yield model
    finally:
        detach(model)


# ---------------------------------------------------------------------------- prompts


def format_prompt(text: str, cfg: DictConfig, tokenizer) -> str:
    """One user message in the form the run was trained on (its `data.format`)."""
    return data_mod.user_prompt(text, cfg.data, tokenizer)


def chat_prompt(messages: list[dict], cfg: DictConfig, tokenizer) -> str:
    """A conversation (`role`/`content` messages, ending with the user's turn) as one prompt.

    `chat` runs render it with the run's chat template; `alpaca` runs get one Alpaca turn per
    exchange, earlier ones followed by their replies; `text` runs see the messages one per line.
    """
    data_format = cfg.data.format
    if data_format == "chat":
        template = data_mod.chat_template(cfg.data, tokenizer)
        return data_mod.render_chat(messages, template, tokenizer, True)
    if data_format == "text":
        return "\n".join(message["content"] for message in messages) + "\n"
    parts = []
    for message in messages:
        if message["role"] == "user":
            parts.append(data_mod.user_prompt(message["content"], cfg.data, tokenizer))
        elif message["role"] == "assistant":
            parts.append(message["content"] + "\n\n")
    return "".join(parts)


def prompt_ids(tokenizer, text: str, add_special_tokens: bool | None = None) -> list[int]:
    """Token ids of a prompt as training made them.

    Alpaca and text prompts get the tokenizer's special tokens (its BOS, if it adds one); a
    rendered chat template carries its own (`add_special_tokens=False`). None decides from the
    text: special tokens are added unless it already starts with the BOS token.
    """
    if add_special_tokens is None:
        bos = tokenizer.bos_token
        add_special_tokens = not (bos and text.startswith(bos))
    return tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]


# ---------------------------------------------------------------------------- generation


def left_padded(
    prompt_ids: list[list[int]], pad_id: int, device: str | torch.device
) -> dict[str, torch.Tensor]:
    """Left-pad token id lists into a batch, so every prompt ends at the last column."""
    width = max(len(ids) for ids in prompt_ids)
    input_ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for i, ids in enumerate(prompt_ids):
        input_ids[i, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, width - len(ids) :] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}


def generation_config(tokenizer, max_new_tokens: int, temperature: float = 0.0):
    """Greedy (temperature 0) or plain sampling, stopping at EOS; nothing from the model's defaults
    (top-k, top-p, repetition penalties) changes the distribution."""
    from transformers import GenerationConfig

    sampling = (
        {"do_sample": True, "temperature": float(temperature), "top_k": 0, "top_p": 1.0}
        if temperature > 0
        else {"do_sample": False}
    )
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id
        if tokenizer.pad_token_id is not None
        else tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        **sampling,
    )


def new_text(tokenizer, token_ids: list[int]) -> str:
    """Decode generated ids up to (not including) the first EOS."""
    eos = tokenizer.eos_token_id
    if eos in token_ids:
        token_ids = token_ids[: token_ids.index(eos)]
    return tokenizer.decode(token_ids, skip_special_tokens=True)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Dropout off for decoding; the model's training flag is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def generate_texts(
    model: nn.Module,
    head: MoDEHead | None,
    tokenizer,
    prompts: list[str],
    *,
    head_kind: str = "ensemble",
    max_new_tokens: int = 64,
    device: str,
    batch_size: int = 8,
    add_special_tokens: bool | None = None,
) -> list[str]:
    """Greedy completions of already formatted prompts, decoded with `head_kind`.

    Batched with left padding and the KV cache; stops each sequence at EOS and returns only the
    new text. Prompts are tokenized as in training (see `add_special_tokens`).

    Args:
        model: what `artifacts.load_run` returns (a peft model or the base) or a merged model.
        head: the run's MoDE head, or None (then only `final` is valid).
        tokenizer: the run's tokenizer.
        prompts: the full prompt texts (template already applied).
        head_kind: `ensemble` (the MoDE head's mix) or `final` (the model's own last layer).
        max_new_tokens: the most tokens generated per prompt.
        device: where the model's inputs go.
        batch_size: prompts decoded together.
        add_special_tokens: whether tokenizing adds the tokenizer's special tokens: True for
            Alpaca and text prompts, False for rendered chat templates; None decides per prompt
            (added unless the prompt starts with the BOS token).
    """
    if max_new_tokens < 1:
        raise ModeError(f"max_new_tokens={max_new_tokens}: expected at least 1")
    config = generation_config(tokenizer, max_new_tokens)
    texts: list[str] = []
    with use_head(model, head_kind, head), eval_mode(model):
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            ids = [prompt_ids(tokenizer, p, add_special_tokens) for p in chunk]
            batch = left_padded(ids, config.pad_token_id, device)
            out = model.generate(**batch, generation_config=config)
            width = batch["input_ids"].shape[1]
            texts += [new_text(tokenizer, row[width:].tolist()) for row in out]
    return texts


# ---------------------------------------------------------------------------- the commands


@dataclass
class DecodingOptions:
    """What `mode generate` and `mode chat` take after `checkpoint=` (key=value each)."""

    prompt: str | None = None
    head: str = "ensemble"
    max_new_tokens: int = 256
    temperature: float = 0.0
    seed: int = 0


def decoding_options(overrides: list[str], *, with_prompt: bool) -> DecodingOptions:
    """Parse `key=value` options; one error lists every problem."""
    options = DecodingOptions()
    keys = [f.name for f in fields(DecodingOptions) if with_prompt or f.name != "prompt"]
    problems = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            problems.append(f"expected key=value, got '{item}'")
        elif key not in keys:
            problems.append(f"unknown option '{key}' (options: checkpoint, {', '.join(keys)})")
        elif key in ("prompt", "head"):
            setattr(options, key, value)
        else:
            kind = type(getattr(DecodingOptions(), key))
            try:
                setattr(options, key, kind(value))
            except ValueError:
                problems.append(
                    f"{key}={value!r}: expected {'an integer' if kind is int else 'a number'}"
                )
    if options.head not in HEAD_KINDS:
        problems.append(f"head={options.head!r}: expected one of {', '.join(HEAD_KINDS)}")
    if options.max_new_tokens < 1:
        problems.append(f"max_new_tokens={options.max_new_tokens}: expected at least 1")
    if options.temperature < 0:
        problems.append(f"temperature={options.temperature}: expected a number >= 0 (0: greedy)")
    if with_prompt and not options.prompt:
        problems.append('prompt="..." is required: the text to answer')
    if problems:
        raise ModeError("Invalid options:\n" + "\n".join(f"  - {p}" for p in problems))
    return options


def load_for_decoding(path: Path, options: DecodingOptions, console):
    """(model, tokenizer) of a run or merged folder, with a status line on stderr."""
    from mode_cli.api import load

    console.print(f"[dim]loading {path} ...[/dim]")
    model, tokenizer = load(path, head=options.head)
    console.print(f"[dim]decoding with the {options.head} head[/dim]")
    return model, tokenizer


def stream_reply(model, tokenizer, prompt: str, options: DecodingOptions) -> str:
    """Generate a reply to a formatted prompt, printing it to stdout as it comes; returns it."""
    from transformers import TextStreamer

    device = next(model.parameters()).device
    chat = model.mode_config.data.format == "chat"
    ids = prompt_ids(tokenizer, prompt, add_special_tokens=not chat)
    inputs = left_padded([ids], tokenizer.pad_token_id, device)
    config = generation_config(tokenizer, options.max_new_tokens, options.temperature)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    torch.manual_seed(options.seed)
    with eval_mode(model):
        # The streamer ends the reply with a newline.
        out = model.generate(**inputs, generation_config=config, streamer=streamer)
    return new_text(tokenizer, out[0, inputs["input_ids"].shape[1] :].tolist())


def stream_one(path: Path, options: DecodingOptions) -> int:
    """`mode generate`: one prompt in the run's format, the answer streamed to stdout."""
    from rich.console import Console

    model, tokenizer = load_for_decoding(path, options, Console(stderr=True))
    stream_reply(
        model, tokenizer, format_prompt(options.prompt, model.mode_config, tokenizer), options
    )
    return 0


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
    positions = getattr(model_mod.base_of(model).config, "max_position_embeddings", None)
    return None if positions is None else max(1, positions - options.max_new_tokens)


def chat_loop(path: Path, options: DecodingOptions) -> int:
    """`mode chat`: read a message per line, stream each reply; the conversation is kept."""
    from rich.console import Console

    console = Console(stderr=True)
    model, tokenizer = load_for_decoding(path, options, console)
    interactive = sys.stdin.isatty()
    console.print("[dim]/exit (or Ctrl-D) ends the chat, /reset forgets it[/dim]")
    messages: list[dict] = []
    chat = model.mode_config.data.format == "chat"

    def length(turns: list[dict]) -> int:
        prompt = chat_prompt(turns, model.mode_config, tokenizer)
        return len(prompt_ids(tokenizer, prompt, add_special_tokens=not chat))

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
