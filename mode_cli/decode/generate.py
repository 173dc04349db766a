"""Generating text from a model, with the MoDE ensemble or the final head: batched greedy answers
(`generate_texts`, for answer accuracy) and a streamed reply (`mode generate`)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from mode_cli.data.formats import chat_template, run_formats
from mode_cli.data.tokenizing import prompt_ids, reply_end
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


def end_of_turn_id(tokenizer, template: str | None) -> int | None:
    """The token a chat template ends an assistant turn with (`<|im_end|>`, `<|eot_id|>`,
    `<end_of_turn>`): the one training ends a chat reply with (`reply_end`), or None when the
    turn ends in plain text or the template refuses a conversation."""
    if template is None:
        return None
    try:
        end = reply_end("chat", tokenizer, template)
    except ModeError:  # a template that refuses the probe conversation has nothing to tell
        return None
    return None if end.token is None else tokenizer.convert_tokens_to_ids(end.token)


def stop_token_ids(tokenizer, template: str | None) -> list[int]:
    """What generation stops at: the tokenizer's EOS and the chat template's end of turn."""
    ids = [tokenizer.eos_token_id, end_of_turn_id(tokenizer, template)]
    return list(dict.fromkeys(i for i in ids if i is not None))


def run_stop_ids(data_cfg, tokenizer) -> list[int]:
    """What a run's replies end with, so decoding stops there: the tokenizer's EOS (Alpaca
    responses and documents are trained with it) and, when any of its rows are chats
    (`data.format` or a `data.mix` source), the chat template's end of turn, which training ends
    a chat reply with instead (a Llama-3 template's `<|eot_id|>` on a base model whose EOS is
    `<|end_of_text|>`)."""
    template = chat_template(data_cfg, tokenizer) if "chat" in run_formats(data_cfg) else None
    return stop_token_ids(tokenizer, template)


def eos_setting(stops: Sequence[int]) -> int | list[int]:
    """`generation_config.eos_token_id` for `stops`: a list when there are several, else the id."""
    return list(stops) if len(stops) > 1 else stops[0]


def generation_config(
    tokenizer, max_new_tokens: int, temperature: float = 0.0, stops: Sequence[int] | None = None
):
    """Greedy (temperature 0) or plain sampling, stopping at `stops` (`run_stop_ids`; the
    tokenizer's EOS when None); nothing from the model's defaults (top-k, top-p, repetition
    penalties) changes the distribution."""
    from transformers import GenerationConfig

    sampling = (
        {"do_sample": True, "temperature": float(temperature), "top_k": 0, "top_p": 1.0}
        if temperature > 0
        else {"do_sample": False}
    )
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_setting(stops or [tokenizer.eos_token_id]),
        pad_token_id=tokenizer.pad_token_id
        if tokenizer.pad_token_id is not None
        else tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        **sampling,
    )


def new_text(tokenizer, token_ids: list[int], stops: Sequence[int] | None = None) -> str:
    """Decode generated ids up to (not including) the first stop (`stops`, else the EOS)."""
    stops = set(stops or [tokenizer.eos_token_id])
    end = next((i for i, token in enumerate(token_ids) if token in stops), len(token_ids))
    return tokenizer.decode(token_ids[:end], skip_special_tokens=True)


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
    stops: Sequence[int] | None = None,
) -> list[str]:
    """Greedy completions of already formatted prompts, decoded with `head_kind`.

    Batched with left padding and the KV cache; stops each sequence at `stops` and returns only the
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
        stops: the token ids a reply ends at (`run_stop_ids`); None: the tokenizer's EOS.
    """
    if max_new_tokens < 1:
        raise ModeError(f"max_new_tokens={max_new_tokens}: expected at least 1")
    formats = [formats] * len(prompts) if isinstance(formats, str) else formats
    ids = [prompt_ids(tokenizer, p, f) for p, f in zip(prompts, formats, strict=True)]
    config = generation_config(tokenizer, max_new_tokens, stops=stops)
    texts: list[str] = []
    with use_head(model, head_kind, head) as decoder, eval_mode(decoder):
        for start in range(0, len(prompts), batch_size):
            batch = left_padded(ids[start : start + batch_size], config.pad_token_id, device)
            out = decoder.generate(**batch, generation_config=config)
            width = batch["input_ids"].shape[1]
            texts += [new_text(tokenizer, row[width:].tolist(), stops) for row in out]
    return texts


def stream_reply(model, tokenizer, prompt: str, options: DecodingOptions) -> str:
    """Generate a reply to a formatted prompt, printing it to stdout as it comes; returns it."""
    from transformers import TextStreamer

    device = next(model.parameters()).device
    ids = prompt_ids(tokenizer, prompt, model.mode_config.data.format)
    inputs = left_padded([ids], tokenizer.pad_token_id, device)
    stops = run_stop_ids(model.mode_config.data, tokenizer)
    config = generation_config(tokenizer, options.max_new_tokens, options.temperature, stops)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    torch.manual_seed(options.seed)
    with eval_mode(model):
        # The streamer ends the reply with a newline.
        out = model.generate(**inputs, generation_config=config, streamer=streamer)
    return new_text(tokenizer, out[0, inputs["input_ids"].shape[1] :].tolist(), stops)
