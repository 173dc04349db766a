"""What a model holds in memory under a recipe, read from its config.json alone: no weights.

Two measurements feed the memory plan (`memory.py`):

- The parameters, counted on a skeleton of the model built on the meta device (no memory, no
  weights), with the recipe's adapter and MoDE head attached: the decoder's linear weights that
  load in 4 bits, the layers kept unquantized (embeddings, LM head, norms, biases), the adapter's
  tensors and the head's.
- The activations autograd saves for backward, per token, measured on a stand-in: the same
  architecture with every width (hidden, intermediate, head and adapter sizes) divided by one
  factor, random weights, loaded in 4 bits and adapted exactly as training loads the real model,
  one forward of the training loss through it under `torch.autograd.graph.saved_tensors_hooks`.
  Whatever transformers, peft and bitsandbytes keep is counted, not guessed; widths enter the
  saved tensors linearly, so the count scales back by the factor. Measured at five batch shapes,
  the bytes split into a constant (casts of the adapter's weights under autocast), per-position
  terms (rotary tables), per-row terms (a sequence's first and last positions are no targets),
  per-token terms and per-row-squared terms (attention masks, eager attention's scores).
"""

from __future__ import annotations

import copy
import gc
import json
import tempfile
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from mode_cli.config import method
from mode_cli.errors import ModeError
from mode_cli.files import BUNDLED_DIR
from mode_cli.models import families
from mode_cli.models.loading import (
    adapter_targets,
    first_line,
    give_back_freed_memory,
    peft_config,
    resolve_source,
)
from mode_cli.train.heads import build_head, selected_layers
from mode_cli.train.memory import Activations, Growth, ModelFacts, Parameters

# Bundled config.json copies of the shipped recipes' hub models: the plan of a gated or
# unreachable model still has its shape (mode_cli/bundled/configs/README.md).
BUNDLED_CONFIGS = BUNDLED_DIR / "configs"
# The stand-in's widths are the real ones divided by the largest of these that divides them all.
SCALES = (16, 8, 4, 2, 1)
# The batch shapes (rows, positions) the stand-in runs: enough to solve for the five terms.
PROBE_SHAPES = ((1, 32), (2, 32), (1, 64), (2, 64), (3, 48))


# ---------------------------------------------------------------------------- the model's config


def model_config(model_cfg: DictConfig):
    """The transformers config of the recipe's model, read without its weights.

    A hub id that cannot be reached (offline, or a gated model without a login) falls back to
    mode's bundled copy of its config.json, when there is one. Returns (config, where it came
    from)."""
    from transformers import AutoConfig

    name = model_cfg.name_or_path
    source = resolve_source(model_cfg)
    try:
        config = AutoConfig.from_pretrained(
            source, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code
        )
        return config, name
    except (OSError, ValueError) as err:
        bundled = BUNDLED_CONFIGS / source / "config.json"
        if Path(source).exists() or not bundled.is_file():
            raise ModeError(f"Could not read the config of '{name}': {first_line(err)}") from None
    config = AutoConfig.for_model(**json.loads(bundled.read_text()))
    return config, f"{name} (mode's bundled copy of its config.json; the hub was not reached)"


# ---------------------------------------------------------------------------- parameters


def skeleton(config, cfg: DictConfig):
    """The model on the meta device, with the recipe's adapter attached (when it trains one)."""
    from accelerate import init_empty_weights
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    families.family_of(model)
    if method(cfg).trains_adapter:
        targets = adapter_targets(model, cfg.adapter.target_modules)
        model = get_peft_model(model, peft_config(cfg.adapter, targets))
    return model


def count_parameters(config, cfg: DictConfig) -> Parameters:
    """What `load_base_model` quantizes and keeps, what the adapter and head train."""
    from torch import nn

    model = skeleton(config, cfg)
    base = families.base_of(model)
    family = families.family_of(base)
    layers = families.get_attr(base, family.layers)
    quantized, tensors, largest = 0, 0, 0
    if cfg.model.quantization == "nf4":
        for layer in layers:
            for module in layer.modules():
                # A peft target keeps its frozen linear as `base_layer`; lora_A / lora_B train.
                if isinstance(module, nn.Linear) and not _is_adapter(module):
                    quantized += module.weight.numel()
                    tensors += 1
                    largest = max(largest, module.weight.numel())
    adapter = tuple(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    embeddings, head = base.get_input_embeddings(), families.lm_head(model)
    if getattr(config, "tie_word_embeddings", False) and head.weight is not embeddings.weight:
        total -= head.weight.numel()  # one tensor once loaded (the skeleton leaves them apart)
    head_params = 0
    if method(cfg).trains_head:
        from accelerate import init_empty_weights

        with init_empty_weights():
            head_params = sum(p.numel() for p in build_head(cfg, model, "meta").parameters())
    return Parameters(
        quantized=quantized,
        quantized_tensors=tensors,
        largest_quantized=largest,
        dense=total - sum(adapter) - quantized,
        decoder_layer=sum(p.numel() for p in layers[0].parameters() if not p.requires_grad),
        adapter=adapter,
        head=head_params,
    )


def _is_adapter(module) -> bool:
    return any(p.requires_grad for p in module.parameters())


# ---------------------------------------------------------------------------- activations


def probe_scale(config, cfg: DictConfig) -> int:
    """The largest of SCALES dividing every width the stand-in shrinks (hidden, intermediate,
    head and adapter sizes), leaving the model's widths at least 4 wide, the adapter's rank at
    least 1 and the rotary dimensions even."""
    widths = [(config.hidden_size, 4), (config.intermediate_size, 4), (head_dim(config), 4)]
    if method(cfg).trains_adapter:
        widths.append((cfg.adapter.r, 1))
    for scale in SCALES:
        if any(width % scale or width // scale < least for width, least in widths):
            continue
        rotary = int(head_dim(config) // scale * rotary_fraction(config))
        if rotary >= 2 and rotary % 2 == 0:
            return scale
    return 1


def head_dim(config) -> int:
    explicit = getattr(config, "head_dim", None)
    return explicit or config.hidden_size // config.num_attention_heads


def rotary_fraction(config) -> float:
    parameters = getattr(config, "rope_parameters", None) or {}
    return float(
        parameters.get("partial_rotary_factor")
        or getattr(config, "partial_rotary_factor", None)
        or getattr(config, "rotary_pct", None)
        or 1.0
    )


def stand_in_config(config, scale: int, depth: int):
    """The config of the stand-in: widths divided by `scale`, `depth` layers, a small vocabulary
    (the loss's logits are planned apart, from the chunk budget)."""
    small = copy.deepcopy(config)
    small.hidden_size = config.hidden_size // scale
    small.intermediate_size = config.intermediate_size // scale
    if getattr(config, "head_dim", None):
        small.head_dim = config.head_dim // scale
    small.num_hidden_layers = depth
    small.vocab_size = 128
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if hasattr(small, key):
            setattr(small, key, 0)
    if getattr(small, "layer_types", None) is not None:
        small.layer_types = list(config.layer_types[-depth:])
    # Long-context rope scalings carry per-dimension tables of the real head size; the saved
    # tensors are the same under the default rope.
    parameters = getattr(small, "rope_parameters", None)
    if isinstance(parameters, dict) and parameters.get("rope_type", "default") != "default":
        keep = {k: v for k, v in parameters.items() if k in ("rope_theta", "partial_rotary_factor")}
        small.rope_parameters = {"rope_type": "default", **keep}
    return small


def stand_in_recipe(cfg: DictConfig, scale: int, num_layers: int) -> tuple[DictConfig, int]:
    """The recipe for the stand-in: the adapter's rank divided by `scale`, and the MoDE head's
    layers counted from the end, in a stand-in just deep enough to hold them (2 layers at
    least). Returns (recipe, depth)."""
    small = copy.deepcopy(cfg)
    depth = 2
    with open_dict(small):
        if method(cfg).trains_adapter:
            small.adapter.r = max(1, cfg.adapter.r // scale)
            small.adapter.alpha = cfg.adapter.alpha
        if method(cfg).trains_head:
            layers = selected_layers(cfg, num_layers)
            depth = max(depth, num_layers - layers[0] + 1)
            small.layers.indices = [layer - num_layers - 1 for layer in layers]
    return small, depth


def probe_activations(config, cfg: DictConfig) -> tuple[Activations, int]:
    """Saved-for-backward bytes of the training forward, from a stand-in of the model scaled down
    by `probe_scale` (module docstring). Returns (the activations at full size, the scale)."""
    scale = probe_scale(config, cfg)
    small_cfg, depth = stand_in_recipe(cfg, scale, config.num_hidden_layers)
    small = stand_in_config(config, scale, depth)
    state = torch.random.get_rng_state()
    try:
        counts = _measure_stand_in(small, small_cfg, cfg.train.precision)
    finally:
        torch.random.set_rng_state(state)
    # The stand-in is gone: give its memory back, or a training process that planned first
    # would keep it (glibc keeps freed memory for reuse).
    gc.collect()
    give_back_freed_memory()
    layer = _solve([c["layer"] for c in counts])
    outside = _solve([c["outside"] for c in counts])
    dropout = _solve([c["dropout"] for c in counts])
    activations = Activations(
        layer=layer.scaled(scale),
        outside=outside.scaled(scale),
        dropout_mask_per_token=dropout.per_token * scale,
        input_per_token=config.hidden_size * counts[0]["state_element"],
    )
    return activations, scale


def _measure_stand_in(small, small_cfg: DictConfig, precision: str) -> list[dict]:
    """The stand-in built from `small` (random weights, saved and loaded as the recipe loads a
    base, adapted), measured at each of PROBE_SHAPES."""
    from transformers import AutoModelForCausalLM

    from mode_cli.models.loading import attach_adapter, load_base_model

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="mode-plan-") as tmp:
        AutoModelForCausalLM.from_config(small).save_pretrained(tmp)
        model_cfg = OmegaConf.merge(small_cfg.model, {"name_or_path": tmp, "revision": None})
        model = load_base_model(tmp, model_cfg, precision, "cpu")
    if method(small_cfg).trains_adapter:
        model = attach_adapter(model, small_cfg.adapter, gradient_checkpointing=False)
    head = build_head(small_cfg, model, "cpu")
    model.train()
    return [_saved_bytes(model, head, small_cfg, rows, length) for rows, length in PROBE_SHAPES]


def _solve(values: list[float]) -> Growth:
    """The growth that fits the bytes measured at PROBE_SHAPES exactly."""
    rows = [[1.0, t, b, b * t, b * t * t] for b, t in PROBE_SHAPES]
    solution = torch.linalg.solve(
        torch.tensor(rows, dtype=torch.float64), torch.tensor(values, dtype=torch.float64)
    )
    return Growth(*(round(float(x), 3) for x in solution))


def _saved_bytes(model, head, cfg: DictConfig, rows: int, length: int) -> dict:
    """Bytes of new tensors autograd saves in one forward of the training loss, by where they
    are saved: in a steady decoder layer (the second; the first also saves what every layer
    shares), outside the layers, in dropout (its mask)."""
    from torch import nn

    from mode_cli.mode.weighting import loss_weights
    from mode_cli.train.steps import batch_loss

    base = families.base_of(model)
    layers = families.get_attr(base, families.family_of(base).layers)
    known = {p.untyped_storage().data_ptr() for p in model.parameters()}
    known |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    if head is not None:
        known |= {p.untyped_storage().data_ptr() for p in head.parameters()}
    where = {"layer": None, "dropout": False}
    totals = {"layer": 0, "outside": 0, "dropout": 0, "layers": 0}
    seen: set[int] = set()

    def pack(tensor):
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in known or key in seen or tensor.is_meta:
            return tensor
        seen.add(key)
        size = storage.nbytes()
        if where["layer"] is None:
            totals["outside"] += size
        else:
            totals["layers"] += size
            if where["layer"] == 1:
                totals["layer"] += size
                if where["dropout"]:
                    totals["dropout"] += size
        return tensor

    hooks = []
    for index, layer in enumerate(layers):
        hooks.append(layer.register_forward_pre_hook(lambda m, a, i=index: where.update(layer=i)))
        hooks.append(layer.register_forward_hook(lambda m, a, o: where.update(layer=None)))
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            hooks.append(module.register_forward_pre_hook(lambda m, a: where.update(dropout=True)))
            hooks.append(module.register_forward_hook(lambda m, a, o: where.update(dropout=False)))
    generator = torch.Generator().manual_seed(rows * 1000 + length)
    ids = torch.randint(1, base.config.vocab_size, (rows, length), generator=generator)
    attention = torch.ones_like(ids)
    attention[:, -1] = 0  # padding: the batch needs an attention mask, as padded batches do
    batch = {
        "input_ids": ids,
        "attention_mask": attention,
        "labels": ids.masked_fill(attention == 0, -100),
    }
    heads_layers = head.layers if head is not None else []
    weights = loss_weights(cfg.loss, heads_layers, 1, cfg.train.max_steps)
    bf16 = cfg.train.precision == "bf16"

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)

    with torch.no_grad(), autocast():
        states = families.hidden_states(model, ids[:1, :2], attention[:1, :2])
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast():
            batch_loss(model, head, batch, weights, cfg.loss.impl)
    finally:
        for hook in hooks:
            hook.remove()
    # The first layer's share beyond a steady layer's: tables every layer reads (masks, rotary).
    first = totals["layers"] - (len(layers) - 1) * totals["layer"]
    return {
        "layer": totals["layer"],
        "outside": totals["outside"] + first - totals["layer"],
        "dropout": totals["dropout"],
        "state_element": states[1].element_size(),
    }


def model_facts(cfg: DictConfig) -> ModelFacts:
    """Everything the memory plan needs to know of the recipe's model: its config.json read
    (`model_config`), its parameters counted on a skeleton, its activations probed on a stand-in.
    Kept for the process, by the recipe's sections they depend on (a dry run plans twice)."""
    key = OmegaConf.to_yaml(
        {name: cfg[name] for name in ("model", "adapter", "layers", "router", "loss")}
        | {"precision": cfg.train.precision}
    )
    if key not in _FACTS:
        _FACTS[key] = _model_facts(cfg)
    return _FACTS[key]


_FACTS: dict[str, ModelFacts] = {}


def _model_facts(cfg: DictConfig) -> ModelFacts:
    config, source = model_config(cfg.model)
    params = count_parameters(config, cfg)
    activations, _ = probe_activations(config, cfg)
    quantized = cfg.model.quantization == "nf4"
    compute = 2 if cfg.train.precision == "bf16" else 4
    family = families.FAMILIES[config.model_type]
    return ModelFacts(
        source=source,
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        vocab_size=config.vocab_size,
        params=params,
        activations=activations,
        quantized=quantized,
        double_quant=cfg.model.double_quant,
        # peft's k-bit preparation casts the unquantized 16-bit weights to fp32.
        dense_bytes=4 if quantized and method(cfg).trains_adapter else compute,
        softcapped=bool(family.softcap and getattr(config, family.softcap, None)),
    )


def model_facts_apart(cfg: DictConfig) -> ModelFacts:
    """`model_facts` measured in a child process, for a training process about to use the plan:
    the stand-in's memory, and the library code its measurement pages in, stay out of the
    process the plan is about."""
    import subprocess
    import sys

    try:
        done = subprocess.run(
            [sys.executable, "-m", "mode_cli.train.footprint"],
            input=OmegaConf.to_yaml(cfg, resolve=True),
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        raise ModeError(
            f"the memory plan's measurement took over {PROBE_TIMEOUT_S} s; set "
            "train.micro_batch_size to a number"
        ) from None
    if done.returncode == 2:
        raise ModeError(done.stderr.strip().splitlines()[-1])
    if done.returncode != 0:
        raise RuntimeError(f"measuring the model for the memory plan failed:\n{done.stderr}")
    return facts_from_dict(json.loads(done.stdout.strip().splitlines()[-1]))


PROBE_TIMEOUT_S = 600


def facts_from_dict(record: dict) -> ModelFacts:
    """A `ModelFacts` from `dataclasses.asdict` of one."""
    activations = record["activations"]
    return ModelFacts(
        **{
            **record,
            "params": Parameters(
                **{**record["params"], "adapter": tuple(record["params"]["adapter"])}
            ),
            "activations": Activations(
                layer=Growth(**activations["layer"]),
                outside=Growth(**activations["outside"]),
                dropout_mask_per_token=activations["dropout_mask_per_token"],
                input_per_token=activations["input_per_token"],
            ),
        }
    )


def _main() -> int:
    """`python -m mode_cli.train.footprint` < recipe.yaml: the facts as JSON on stdout."""
    import sys
    from dataclasses import asdict

    from mode_cli.config import RecipeConfig

    cfg = OmegaConf.merge(OmegaConf.structured(RecipeConfig), OmegaConf.create(sys.stdin.read()))
    try:
        facts = model_facts(cfg)
    except ModeError as err:
        print(str(err), file=sys.stderr)
        return 2
    print(json.dumps(asdict(facts)))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
