"""Generating text from a model, with the MoDE ensemble or the final head: batched greedy answers
(`generate_texts`, for answer accuracy) and a streamed reply (`mode generate`)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from mode_cli.data.tokenizing import prompt_ids
from mode_cli.decode.ensemble import use_head
from mode_cli.errors import ModeError
from mode_cli.mode.head import MoDEHead
from mode_cli.options import DecodingOptions


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
    formats: str | Sequence[str],
    head_kind: str = "ensemble",
    max_new_tokens: int = 64,
    device: str,
    batch_size: int = 8,
) -> list[str]:
    """Greedy completions of already formatted prompts, decoded with `head_kind`.

    Batched with left padding and the KV cache; stops each sequence at EOS and returns only the
    new text. Prompts are tokenized as training tokenized them (`tokenizing.prompt_ids`).

    Args:
        model: what `artifacts.load_run` returns (a peft model or the base) or a merged model.
        head: the run's MoDE head, or None (then only `final` is valid).
        tokenizer: the run's tokenizer.
        prompts: the full prompt texts (template already applied).
        formats: the `data.format` each prompt was rendered in (one for all, or one per prompt):
            it decides whether tokenizing adds the tokenizer's special tokens.
        head_kind: `ensemble` (the MoDE head's mix) or `final` (the model's own last layer).
        max_new_tokens: the most tokens generated per prompt.
        device: where the model's inputs go.
        batch_size: prompts decoded together.
    """
    if max_new_tokens < 1:
        raise ModeError(f"max_new_tokens={max_new_tokens}: expected at least 1")
    formats = [formats] * len(prompts) if isinstance(formats, str) else formats
    ids = [prompt_ids(tokenizer, p, f) for p, f in zip(prompts, formats, strict=True)]
    config = generation_config(tokenizer, max_new_tokens)
    texts: list[str] = []
    with use_head(model, head_kind, head) as decoder, eval_mode(decoder):
        for start in range(0, len(prompts), batch_size):
            batch = left_padded(ids[start : start + batch_size], config.pad_token_id, device)
            out = decoder.generate(**batch, generation_config=config)
            width = batch["input_ids"].shape[1]
            texts += [new_text(tokenizer, row[width:].tolist()) for row in out]
    return texts


def stream_reply(model, tokenizer, prompt: str, options: DecodingOptions) -> str:
    """Generate a reply to a formatted prompt, printing it to stdout as it comes; returns it."""
    from transformers import TextStreamer

    device = next(model.parameters()).device
    ids = prompt_ids(tokenizer, prompt, model.mode_config.data.format)
    inputs = left_padded([ids], tokenizer.pad_token_id, device)
    config = generation_config(tokenizer, options.max_new_tokens, options.temperature)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    torch.manual_seed(options.seed)
    with eval_mode(model):
        # The streamer ends the reply with a newline.
        out = model.generate(**inputs, generation_config=config, streamer=streamer)
    return new_text(tokenizer, out[0, inputs["input_ids"].shape[1] :].tolist())
