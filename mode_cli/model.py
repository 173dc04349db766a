"""Loading the base model and tokenizer, quantizing it to NF4, and attaching the LoRA adapter.

Every source ends up as something `from_pretrained` reads: a hub id, a local folder, the packaged
SmolLM2 (converted once from GGUF into a cache, see `smollm2.py`), or a tiny random-init model
built from a config with a fixed seed (saved once into the same cache).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from mode_cli.errors import ModeError
from mode_cli.files import staged_folder
from mode_cli.smollm2 import cache_dir

BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"


@dataclass(frozen=True)
class Family:
    """Where a model family keeps the parts MoDE needs, as attribute paths from the CausalLM.

    `softcap` names the config attribute holding the final-logit soft-capping value (None: the
    family has none); `logit_fn` turns it into the function every layer's logits go through.
    """

    decoder: str
    layers: str
    final_norm: str
    lm_head: str
    softcap: str | None = None


# A small table, not guesswork: the parts MoDE touches differ by architecture. Keyed by
# `config.model_type`; checked per family on tiny random-init models in tests/test_families.py.
# In transformers 5 every decoder here returns its final-normed state as the last hidden state.
FAMILIES: dict[str, Family] = {
    # RMSNorm; untied (Llama-3.2 1B/3B tie).
    "llama": Family(
        decoder="model", layers="model.layers", final_norm="model.norm", lm_head="lm_head"
    ),
    # RMSNorm; untied; sliding-window attention in v0.1.
    "mistral": Family(
        decoder="model", layers="model.layers", final_norm="model.norm", lm_head="lm_head"
    ),
    # RMSNorm; q/k/v biases; small sizes tie the embeddings.
    "qwen2": Family(
        decoder="model", layers="model.layers", final_norm="model.norm", lm_head="lm_head"
    ),
    # RMSNorm, plus per-head q_norm/k_norm inside attention; small sizes tie the embeddings.
    "qwen3": Family(
        decoder="model", layers="model.layers", final_norm="model.norm", lm_head="lm_head"
    ),
    # Offset RMSNorm (scale 1 + w); embeddings scaled by sqrt(hidden) inside the decoder; tied.
    "gemma": Family(
        decoder="model", layers="model.layers", final_norm="model.norm", lm_head="lm_head"
    ),
    # As Gemma, plus sandwich norms, sliding/global layers and final-logit soft-capping; tied.
    "gemma2": Family(
        decoder="model",
        layers="model.layers",
        final_norm="model.norm",
        lm_head="lm_head",
        softcap="final_logit_softcapping",
    ),
    # RMSNorm; fused qkv_proj and gate_up_proj; untied.
    "phi3": Family(
        decoder="model", layers="model.layers", final_norm="model.norm", lm_head="lm_head"
    ),
    # LayerNorm (with bias); parallel residual; untied. The head is `lm_head` in transformers 5
    # (checkpoints' `embed_out.weight` is renamed on load).
    "gpt_neox": Family(
        decoder="gpt_neox",
        layers="gpt_neox.layers",
        final_norm="gpt_neox.final_layer_norm",
        lm_head="lm_head",
    ),
}


def family_of(model: PreTrainedModel) -> Family:
    """The family entry for a loaded model; an unsupported architecture is a clear error."""
    model_type = model.config.model_type
    if model_type not in FAMILIES:
        raise ModeError(
            f"Unsupported architecture '{model_type}'. Supported: {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[model_type]


def get_attr(root: nn.Module, path: str) -> nn.Module:
    """`get_attr(model, "model.norm")`: follow a dotted attribute path."""
    for part in path.split("."):
        root = getattr(root, part)
    return root


def resolve_bundled(spec: str) -> Path:
    """`bundled:arithmetic/train.jsonl` -> the file shipped inside the package."""
    path = BUNDLED_DIR / spec.removeprefix("bundled:")
    if not path.exists():
        available = sorted(p.name for p in BUNDLED_DIR.iterdir()) if BUNDLED_DIR.is_dir() else []
        raise ModeError(f"No bundled resource '{spec}'. Bundled: {', '.join(available)}")
    return path


# ---------------------------------------------------------------------------- sources


def resolve_source(model_cfg: DictConfig) -> str:
    """A string `from_pretrained` accepts: a local folder or a hub id."""
    name = model_cfg.name_or_path
    if name.startswith("tiny:"):
        family = name.removeprefix("tiny:").replace("-", "_")
        return str(build_tiny_model(family, model_cfg.tiny))
    if name.startswith("package:"):
        package = name.removeprefix("package:")
        if package not in ("smollm2", "smollm2-135m-instruct"):
            raise ModeError(f"Unknown packaged model '{name}'. Packaged: package:smollm2")
        from mode_cli.smollm2 import ensure_converted

        return str(ensure_converted(log=_log))
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModeError(f"{path} is not a model folder: it has no config.json")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModeError(f"Model folder not found: {name}")
    return name


def _log(message: str) -> None:
    from rich.console import Console

    Console(stderr=True).print(f"[dim]{message}[/dim]")


# Tiny families: `tiny:<key>` builds a random-init model of that family (keys as in FAMILIES;
# `gpt-neox` is accepted for `gpt_neox`). Sliding windows are kept shorter than the tiny recipes'
# sequences so the sliding-window masks are exercised too.
TINY_SLIDING_WINDOW = 32


def tiny_config(family: str, tiny: DictConfig, vocab_size: int, special: dict[str, int]):
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


def build_tiny_model(family: str, tiny: DictConfig) -> Path:
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


# ---------------------------------------------------------------------------- loading


def load_tokenizer(source: str, model_cfg: DictConfig):
    """The tokenizer of a model; a pad token is borrowed from EOS when the model has none."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code
        )
    except OSError as err:
        raise ModeError(f"Could not load the tokenizer of '{source}': {first_line(err)}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def compute_dtype(precision: str) -> torch.dtype:
    return torch.bfloat16 if precision == "bf16" else torch.float32


def load_base_model(
    source: str, model_cfg: DictConfig, precision: str, device: str
) -> PreTrainedModel:
    """Load the frozen base model, in NF4 (QLoRA) or in the compute dtype, on `device`."""
    dtype = compute_dtype(precision)
    kwargs: dict = {
        "revision": model_cfg.revision,
        "trust_remote_code": model_cfg.trust_remote_code,
        "dtype": dtype,
    }
    if model_cfg.quantization == "nf4":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=model_cfg.double_quant,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=torch.uint8,
        )
        kwargs["device_map"] = {"": 0} if device == "cuda" else {"": "cpu"}
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as err:
        raise ModeError(f"Could not load the model '{source}': {first_line(err)}") from None
    if model_cfg.quantization != "nf4":
        model.to(device)
    family_of(model)
    guard_cpu_4bit_gradients(model)
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def guard_cpu_4bit_gradients(model: nn.Module) -> None:
    """Keep bitsandbytes' CPU 4-bit layers on the path that has a backward.

    On CPUs with avx512_bf16, a Linear4bit called in eval mode with an input that needs no grad
    repacks its weight for good, and every later call goes through `gemv_4bit`, which has no
    backward: LoRA gradients come out wrong with only a warning. Turning the repacking off keeps
    gradients exact after any no-grad forward or `generate()`.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def linear_module_names(model: nn.Module) -> list[str]:
    """Short names of the linear layers LoRA can target (the LM head excluded)."""
    import bitsandbytes as bnb

    # The head by identity, whatever a family calls it (GPT-NeoX before transformers 5: embed_out).
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = set()
    for full_name, module in model.named_modules():
        if module is head or "lm_head" in full_name:
            continue
        if isinstance(module, nn.Linear | bnb.nn.Linear4bit):
            names.add(full_name.rsplit(".", 1)[-1])
    return sorted(names)


def lora_targets(model: nn.Module, targets) -> str | list[str]:
    """`all-linear`, or the requested module names after checking each matches a linear layer."""
    if targets == "all-linear":
        return targets
    targets = list(targets)
    available = linear_module_names(model)
    missing = [t for t in targets if t not in available]
    if missing:
        raise ModeError(
            f"lora.target_modules: {', '.join(missing)} match no module of this model. "
            f"Linear modules: {', '.join(available)} (or use all-linear)"
        )
    return targets


def peft_lora_config(lora_cfg: DictConfig, targets: str | list[str]):
    """peft's config for the recipe's adapter: LoRA, or DoRA with `use_dora`."""
    from peft import LoraConfig

    return LoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=targets,
        use_dora=lora_cfg.use_dora,
        bias="none",
        task_type="CAUSAL_LM",
    )


def attach_lora(model: PreTrainedModel, lora_cfg: DictConfig, gradient_checkpointing: bool):
    """Wrap the base model with a trainable peft LoRA adapter (edits the base in place)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    targets = lora_targets(model, lora_cfg.target_modules)
    if getattr(model, "is_loaded_in_4bit", False):
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return get_peft_model(model, peft_lora_config(lora_cfg, targets))


def base_of(model: nn.Module) -> PreTrainedModel:
    """The transformers CausalLM under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def num_layers(model: nn.Module) -> int:
    return len(get_attr(base_of(model), family_of(base_of(model)).layers))


def final_norm(model: nn.Module) -> nn.Module:
    return get_attr(base_of(model), family_of(base_of(model)).final_norm)


def lm_head(model: nn.Module) -> nn.Module:
    return get_attr(base_of(model), family_of(base_of(model)).lm_head)


def logit_fn(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """What the model does to logits after the LM head, or None when it does nothing.

    Gemma 2 soft-caps its final logits: `cap * tanh(z / cap)`. Every layer's logits and the
    ensemble's must go through it to match the model's own prediction (METHOD.md 2).
    """
    base = base_of(model)
    family = family_of(base)
    cap = getattr(base.config, family.softcap, None) if family.softcap else None
    if not cap:
        return None
    cap = float(cap)

    def softcap(logits: torch.Tensor) -> torch.Tensor:
        return cap * torch.tanh(logits / cap)

    return softcap


def hidden_states(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor | None = None,
):
    """Run the decoder alone (no full-vocabulary logits) and return all N+1 hidden states.

    Packed sequences (`data.packing`) pass `position_ids` that restart at 0 at every example; the
    decoder is then run without the attention mask, so that transformers builds a block-diagonal
    causal mask from the restarts (sliding windows included): no attention across examples, and
    padding, given positions of its own, is a block nothing real attends to.

    hidden_states[0] is the embedding output (Gemma's already scaled by sqrt(hidden)),
    hidden_states[l] the output of layer l before the final norm, and the last one has the final
    norm applied: `lm_head(hidden_states[-1])` (through `logit_fn`) is the model's own logits.
    """
    base = base_of(model)
    decoder = get_attr(base, family_of(base).decoder)
    out = decoder(
        input_ids=input_ids,
        attention_mask=attention_mask if position_ids is None else None,
        position_ids=position_ids,
        output_hidden_states=True,
        use_cache=False,
    )
    # transformers 5 already puts the final-normed state last (the same tensor as
    # last_hidden_state) for every family here; taking last_hidden_state keeps that contract
    # even for a decoder or config (`tie_last_hidden_states=False`) that would not.
    return (*out.hidden_states[:-1], out.last_hidden_state)
