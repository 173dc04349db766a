"""Tiny random-init models of every supported family (`model.name_or_path: tiny:<family>`): built
from a config with a fixed seed, saved once into the model cache, loaded like any model folder.

Tests and CI train them in seconds; `tiny` is the recipe's `model.tiny` section (`TinyModelConfig`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer

from mode_cli.errors import ModeError
from mode_cli.files import cache_dir, resolve_bundled, staged_folder
from mode_cli.models.families import FAMILIES

TINY_SLIDING_WINDOW = 32


def tiny_config(family: str, tiny, vocab_size: int, special: dict[str, int]):
    """A transformers config for a tiny model of the given family.

    Each family keeps its own defaults (norm, activation, tied or untied embeddings, biases) and
    gets the tiny shape: heads of `hidden_size / num_heads`, grouped KV heads where the family has
    them, the default RoPE.
    """
    import transformers

    family = family.replace("-", "_")
    if family not in FAMILIES:
        raise ModeError(
            f"No tiny model for family '{family}'. Tiny families: {', '.join(sorted(FAMILIES))}"
        )
    head_dim = tiny.hidden_size // tiny.num_heads
    shape = {
        "vocab_size": vocab_size,
        "hidden_size": tiny.hidden_size,
        "intermediate_size": tiny.intermediate_size,
        "num_hidden_layers": tiny.num_layers,
        "num_attention_heads": tiny.num_heads,
        "max_position_embeddings": 4096,
        **special,
    }
    gqa = {"num_key_value_heads": tiny.num_kv_heads}
    if family == "llama":
        return transformers.LlamaConfig(**shape, **gqa, tie_word_embeddings=False)
    if family == "mistral":
        return transformers.MistralConfig(
            **shape, **gqa, head_dim=head_dim, sliding_window=TINY_SLIDING_WINDOW
        )
    if family == "qwen2":
        return transformers.Qwen2Config(**shape, **gqa)
    if family == "qwen3":
        return transformers.Qwen3Config(**shape, **gqa, head_dim=head_dim)
    if family == "gemma":
        return transformers.GemmaConfig(**shape, **gqa, head_dim=head_dim)
    if family == "gemma2":
        return transformers.Gemma2Config(
            **shape,
            **gqa,
            head_dim=head_dim,
            query_pre_attn_scalar=head_dim,
            sliding_window=TINY_SLIDING_WINDOW,
            final_logit_softcapping=30.0,
            attn_logit_softcapping=50.0,
        )
    if family == "phi3":
        return transformers.Phi3Config(**shape, **gqa)
    # gpt_neox: multi-head attention (no KV groups), partial rotary (rotary_pct 0.25).
    return transformers.GPTNeoXConfig(**shape)


def build_tiny_model(family: str, tiny) -> Path:
    """Build (once) and cache a random-init model; the same config and seed give the same weights."""
    tokenizer_source = (
        resolve_bundled(tiny.tokenizer) if tiny.tokenizer.startswith("bundled:") else tiny.tokenizer
    )
    spec = {"family": family, **OmegaConf.to_container(tiny), "format": 1}
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    target = cache_dir() / "tiny" / f"{family}-{digest}"
    if (target / "config.json").is_file():
        return target
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_source))
    special = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = tiny_config(family, tiny, len(tokenizer), special)
    torch.manual_seed(tiny.seed)
    model = AutoModelForCausalLM.from_config(config)
    with staged_folder(target) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "mode_tiny.json").write_text(json.dumps(spec, indent=2))
    return target
