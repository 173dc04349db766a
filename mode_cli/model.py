"""Loading the base model and tokenizer, quantizing it to NF4, and attaching the LoRA adapter.

Every source ends up as something `from_pretrained` reads: a hub id, a local folder, the packaged
SmolLM2 (converted once from GGUF into a cache, see `smollm2.py`), or a tiny random-init model
built from a config with a fixed seed (saved once into the same cache).
"""

from __future__ import annotations

import hashlib
import json
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
    """Where a model family keeps the parts MoDE needs, as attribute paths from the CausalLM."""

    decoder: str
    layers: str
    final_norm: str
    lm_head: str


# A small table, not guesswork: the parts MoDE touches differ by architecture.
FAMILIES: dict[str, Family] = {
    "llama": Family(
        decoder="model", layers="model.layers", final_norm="model.norm", lm_head="lm_head"
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
        return str(build_tiny_model(name.removeprefix("tiny:"), model_cfg.tiny))
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


def tiny_config(family: str, tiny: DictConfig, vocab_size: int, special: dict[str, int]):
    """A transformers config for a tiny model of the given family."""
    if family != "llama":
        raise ModeError(f"No tiny model for family '{family}'. Tiny families: llama")
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=tiny.hidden_size,
        intermediate_size=tiny.intermediate_size,
        num_hidden_layers=tiny.num_layers,
        num_attention_heads=tiny.num_heads,
        num_key_value_heads=tiny.num_kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        **special,
    )


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

    names = set()
    for full_name, module in model.named_modules():
        if isinstance(module, nn.Linear | bnb.nn.Linear4bit) and "lm_head" not in full_name:
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
    from peft import LoraConfig

    return LoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=targets,
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


def hidden_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """Run the decoder alone (no full-vocabulary logits) and return all N+1 hidden states.

    hidden_states[0] is the embedding output, hidden_states[l] the output of layer l; in
    transformers 5 the last one already has the final norm applied.
    """
    base = base_of(model)
    decoder = get_attr(base, family_of(base).decoder)
    out = decoder(
        input_ids=input_ids,
        attention_mask=attention_mask,
        output_hidden_states=True,
        use_cache=False,
    )
    return out.hidden_states
