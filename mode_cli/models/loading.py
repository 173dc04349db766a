"""Loading the base model and tokenizer, quantizing it to NF4, and attaching the peft adapter.

Every source ends up as something `from_pretrained` reads: a hub id, a local folder, the packaged
SmolLM2 (converted once from GGUF into the cache, see `smollm2.py`), or a tiny random-init model
built from a config with a fixed seed (`tiny.py`, saved once into the same cache).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from mode_cli.devices import cuda_index, is_cuda
from mode_cli.errors import ModeError
from mode_cli.files import read_json
from mode_cli.models import families
from mode_cli.models.families import family_of
from mode_cli.models.smollm2 import ensure_converted
from mode_cli.models.tiny import build_tiny_model

log = logging.getLogger(__name__)

# `model.quantization`: the frozen base in NF4 (QLoRA), or in the compute dtype.
QUANTIZATIONS = ("nf4", "none")
# `train.precision`: the compute dtype of the 4-bit layers and of the trainable weights.
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}
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
        return str(ensure_converted(log=log.info))
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModeError(f"{path} is not a model folder: it has no config.json")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModeError(f"Model folder not found: {name}")
    return name


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
    return PRECISIONS[precision]


def base_placement(model_cfg: DictConfig, precision: str, device: str) -> dict:
    """How the frozen base is loaded on `device`: its dtype, and for NF4 bitsandbytes' settings
    and the device map (`from_pretrained` quantizes while it loads, onto that one device)."""
    placement: dict = {"dtype": compute_dtype(precision)}
    if model_cfg.quantization == "nf4":
        placement["quantization"] = {
            "load_in_4bit": True,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": model_cfg.double_quant,
            "bnb_4bit_compute_dtype": placement["dtype"],
            "bnb_4bit_quant_storage": torch.uint8,
        }
        # One device per process: `cuda` is GPU 0, `cuda:N` (a rank of a torchrun job) GPU N.
        placement["device_map"] = {"": cuda_index(device) if is_cuda(device) else "cpu"}
    return placement


def ensemble_config(folder: str | Path):
    """The MoDE config of an ensemble export (a folder whose config.json is `model_type: mode`),
    else None."""
    from mode_cli.models.modeling_mode import MoDEConfig

    config = Path(folder) / "config.json"
    saved = read_json(config) if config.is_file() else None
    if not isinstance(saved, dict) or saved.get("model_type") != MoDEConfig.model_type:
        return None
    return MoDEConfig.from_pretrained(str(folder))


def ensemble_export_reading(source: str) -> dict:
    """The `from_pretrained` arguments that read an ensemble export as its base family's
    CausalLM: the family's config, and the weights' `model.base.*` names as the family's own.
    Nothing for any other source."""
    exported = ensemble_config(source)
    if exported is None:
        return {}
    family = families.FAMILIES.get(exported.base_model_type)
    if family is None:
        raise ModeError(
            f"{source} is a MoDE model of '{exported.base_model_type}', which mode does not "
            f"support. Supported: {', '.join(sorted(families.FAMILIES))}"
        )
    return {
        "config": exported.base_config(),
        "key_mapping": {r"^model\.base\.": f"{family.decoder}."},
    }


def load_base_model(
    source: str, model_cfg: DictConfig, precision: str, device: str, **extra
) -> PreTrainedModel:
    """Load the frozen base model, in NF4 (QLoRA) or in the compute dtype, on `device`
    (`base_placement` says how); an ensemble export is read as its base family's model
    (`ensemble_export_reading`). `extra` goes to `from_pretrained`."""
    placement = base_placement(model_cfg, precision, device)
    kwargs: dict = {
        "revision": model_cfg.revision,
        "trust_remote_code": model_cfg.trust_remote_code,
        "dtype": placement["dtype"],
        **ensemble_export_reading(source),
        **extra,
    }
    if "quantization" in placement:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(**placement["quantization"])
        kwargs["device_map"] = placement["device_map"]
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as err:
        raise ModeError(f"Could not load the model '{source}': {first_line(err)}") from None
    if "quantization" not in placement:
        model.to(device)
    if not is_cuda(device):
        release_file_mapping(model)
    family_of(model)
    guard_cpu_4bit_gradients(model)
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def release_file_mapping(model: nn.Module) -> None:
    """Copy the weights that are views of the checkpoint file, so that the file is unmapped.

    On the CPU, a weight loaded in its file's dtype (SmolLM2's fp32 embeddings, every weight of
    an unquantized fp32 model) is a view of the safetensors file mapped into memory, and the
    whole file then stays mapped while the model lives: every page the loader read counts in the
    process's resident memory (540 MB for SmolLM2), on top of the weights the model uses. The
    4-bit weights are new tensors already.
    """
    for tensor in [*model.parameters(), *model.buffers()]:
        if type(tensor).__name__ != "Params4bit":
            tensor.data = tensor.data.clone()
    give_back_freed_memory()


def give_back_freed_memory() -> None:
    """Return the memory the C allocator keeps after frees to the system (glibc's malloc_trim).

    Loading and quantizing a model frees hundreds of MB in pieces that glibc keeps for reuse; how
    much stays depends on the order of the frees, and it adds to training's peak (200 to 500 MB
    more for SmolLM2 from run to run). Elsewhere than glibc this does nothing.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # no C library found, or not glibc
        return
    if trim is not None:
        trim(0)


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


def adapter_targets(model: nn.Module, targets) -> str | list[str]:
    """`all-linear`, or the requested module names after checking each matches a linear layer."""
    if targets == "all-linear":
        return targets
    targets = list(targets)
    available = linear_module_names(model)
    missing = [t for t in targets if t not in available]
    if missing:
        raise ModeError(
            f"adapter.target_modules: {', '.join(missing)} match no module of this model. "
            f"Linear modules: {', '.join(available)} (or use all-linear)"
        )
    return targets


def peft_config(adapter_cfg: DictConfig, targets: str | list[str]):
    """peft's config for the recipe's adapter: LoRA, or DoRA with `use_dora`."""
    from peft import LoraConfig

    return LoraConfig(
        r=adapter_cfg.r,
        lora_alpha=adapter_cfg.alpha,
        lora_dropout=adapter_cfg.dropout,
        target_modules=targets,
        use_dora=adapter_cfg.use_dora,
        bias="none",
        task_type="CAUSAL_LM",
    )


def attach_adapter(
    model: PreTrainedModel, adapter_cfg: DictConfig, gradient_checkpointing: bool
) -> nn.Module:
    """Wrap the base model with a trainable peft adapter (edits the base in place)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    targets = adapter_targets(model, adapter_cfg.target_modules)
    if getattr(model, "is_loaded_in_4bit", False):
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return get_peft_model(model, peft_config(adapter_cfg, targets))
