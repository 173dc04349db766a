"""Will it fit? The memory a training process needs at its peak, planned before anything loads.

`plan_memory` is arithmetic on what `footprint.py` reads from the model's config.json (parameter
counts, the activations autograd saves per token) and on the recipe's knobs; docs/memory.md
explains each line, docs/benchmarks.md compares the plan with measurements
(`scripts/bench_memory.py --calibrate`, which also fits the CPU `CALIBRATION` constants). Per
process:

    frozen weights (4-bit + quantization state + unquantized layers) + adapter + MoDE head
    + gradients + optimizer states
    + the larger of: end of forward (saved activations + the loss's logits chunk and inputs),
      backward with gradient checkpointing (layer inputs + one layer recomputed)
    + a dequantized 4-bit weight, the runtime (CUDA context; CPU: the process's own), the data
    + allocator slack

`largest_micro_batch` turns the plan around for `train.micro_batch_size=auto`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from mode_cli.devices import is_cuda
from mode_cli.errors import ModeError
from mode_cli.mode.chunked import DEFAULT_CHUNK_BUDGET, peak_logits
from mode_cli.mode.terms import LossWeights

GIB = 2**30
MIB = 2**20
# bitsandbytes NF4: 4 bits a weight, one absmax per block of 64 weights (an 8-bit code with
# double quantization, whose own fp32 absmax covers 256 blocks), and per tensor the 16-value
# NF4 code and, double-quantized, the 256-value code of the absmax.
NF4_BLOCK = 64
DOUBLE_QUANT_BLOCK = 256
# bitsandbytes' 8-bit optimizers keep 8-bit states only for tensors of at least this many values
# (`min_8bit_size`); smaller ones stay fp32. A block of 256 values shares one fp32 scale.
MIN_8BIT_SIZE = 4096
OPTIMIZER_BLOCK = 256
# `train.micro_batch_size=auto` keeps this share of the device's free memory in reserve.
AUTO_MARGIN = 0.10
# The most examples `auto` tries in one micro-batch.
AUTO_MAX_MICRO_BATCH = 1024


@dataclass(frozen=True)
class Calibration:
    """What the tensors alone do not show, per device type.

    runtime: bytes the process holds once training runs besides its tensors, tokenizer and data
    (CUDA: the context; CPU: threads and the libraries' working memory, over the process's
    resident memory after its imports).
    working_layers: the working memory of the layer being computed (its temporaries, and in
    backward the gradients flowing through it), in units of one layer's saved activations.
    slack: what the allocator holds beyond the live tensors, as a share of `slack_of`: on the
    CPU of the activations a forward pass allocates, all layers' together (glibc's malloc keeps
    memory freed mid-step for reuse, and a layer's temporaries land between tensors that stay);
    on CUDA of the step's own peak allocations (the caching allocator reserves in blocks).
    slack_checkpointed: `slack` with gradient checkpointing (CPU: its forward keeps only layer
    inputs between the temporaries).
    tokenizer_per_entry: bytes the loaded tokenizer takes per vocabulary entry (CPU plans; on
    CUDA it is host memory).
    dropout_mask_bytes: bytes of dropout's mask per value (fp32 on the CPU, bool on CUDA).
    measured: whether `scripts/bench_memory.py` measured these (False: estimates).
    """

    runtime: float
    working_layers: float
    slack: float
    slack_checkpointed: float
    slack_of: str  # "forward": all layers' activations; "peak": the step's dynamic peak
    dropout_mask_bytes: int
    measured: bool
    tokenizer_per_entry: float = 0.0


# Written by `scripts/bench_memory.py --calibrate --write-constants`: the CPU constants fitted on
# SmolLM2 and the tiny families (docs/benchmarks.md, "The memory plan against measurements").
CALIBRATION_FILE = Path(__file__).with_name("memory_calibration.json")


def _fitted(device: str) -> dict:
    if not CALIBRATION_FILE.is_file():
        return {}
    return json.loads(CALIBRATION_FILE.read_text()).get(device, {})


CPU_FITTED = _fitted("cpu")
CALIBRATION = {
    "cpu": Calibration(
        runtime=CPU_FITTED.get("runtime", 0.0),
        working_layers=CPU_FITTED.get("working_layers", 0.0),
        slack=CPU_FITTED.get("slack", 0.0),
        slack_checkpointed=CPU_FITTED.get("slack_checkpointed", 0.0),
        slack_of="forward",
        dropout_mask_bytes=4,
        measured=bool(CPU_FITTED),
        tokenizer_per_entry=CPU_FITTED.get("tokenizer_per_entry", 0.0),
    ),
    # Not measured (no GPU has run scripts/gpu_check.py): a CUDA context of torch 2.x on a recent
    # GPU, a layer's gradients as large as its activations, a caching allocator's usual reserve.
    "cuda": Calibration(
        runtime=0.5 * GIB,
        working_layers=1.0,
        slack=0.10,
        slack_checkpointed=0.10,
        slack_of="peak",
        dropout_mask_bytes=1,
        measured=False,
    ),
}


@dataclass(frozen=True)
class Parameters:
    """Parameter counts of the model under the recipe (values, not bytes)."""

    quantized: int  # the decoder's linear weights (4 bits with model.quantization=nf4)
    quantized_tensors: int
    largest_quantized: int  # the largest of them (a 4-bit matmul dequantizes it)
    dense: int  # the rest of the base: embeddings, LM head when untied, norms, biases
    decoder_layer: int  # one decoder layer's frozen parameters (an FSDP unit)
    adapter: tuple[int, ...]  # each trainable adapter tensor
    head: int  # the MoDE head (norms, router)

    @property
    def trainable(self) -> int:
        return sum(self.adapter) + self.head


@dataclass(frozen=True)
class Growth:
    """Bytes by what they grow with: `constant`, `per_position` (x sequence length), `per_row`
    (x rows: a sequence's first and last positions are no targets), `per_token` (x rows x
    length) and `per_row_square` (x rows x length^2: attention masks and scores)."""

    constant: float = 0.0
    per_position: float = 0.0
    per_row: float = 0.0
    per_token: float = 0.0
    per_row_square: float = 0.0

    def at(self, rows: int, length: int) -> float:
        """The bytes of a micro-batch of `rows` sequences of `length` tokens."""
        return (
            self.constant
            + self.per_position * length
            + self.per_row * rows
            + self.per_token * rows * length
            + self.per_row_square * rows * length**2
        )

    def scaled(self, scale: int) -> Growth:
        """From a stand-in with widths divided by `scale` to the model (`footprint.py`): widths
        enter per-token, per-row and per-position bytes linearly and weight-sized constants as
        the square; masks and attention scores (rows x heads x length^2; the stand-in keeps the
        head count) do not depend on widths."""
        return Growth(
            self.constant * scale**2,
            self.per_position * scale,
            self.per_row * scale,
            self.per_token * scale,
            self.per_row_square,
        )


@dataclass(frozen=True)
class Activations:
    """What autograd saves for backward in one forward of the training loss: per decoder layer,
    and outside the layers (the embedding output, the final norm, the MoDE head's inputs, less
    what the first layer does not save: its input needs no gradient)."""

    layer: Growth
    outside: Growth
    # Of `layer.per_token`: dropout's masks, measured on the CPU (fp32 a value).
    dropout_mask_per_token: float
    # One layer's input: all that gradient checkpointing keeps of a layer until backward.
    input_per_token: float


@dataclass(frozen=True)
class ModelFacts:
    """What the plan knows of the model under the recipe: read from its config.json
    (`footprint.model_facts`), or given by a test."""

    source: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    params: Parameters
    activations: Activations
    quantized: bool = True  # model.quantization=nf4
    double_quant: bool = True
    dense_bytes: int = 4  # bytes a value of the unquantized layers (fp32 after k-bit preparation)
    softcapped: bool = False  # logits go through a soft cap (Gemma 2)


@dataclass(frozen=True)
class Setup:
    """The recipe's knobs the plan depends on (and its suggestions change)."""

    micro_batch: int
    seq_len: int
    gradient_checkpointing: bool
    optimizer: str  # adamw | adamw_8bit | paged_adamw_8bit
    precision: str  # fp32 | bf16
    device: str  # cpu | cuda: a device type
    loss_weights: LossWeights
    num_selected: int  # logit rows of the loss: the MoDE head's layers (1 for final-only)
    routed: bool
    loss_impl: str = "chunked"
    processes: int = 1
    strategy: str = "ddp"
    grad_accum_steps: int = 1
    data_bytes: float = 0.0  # the tokenized data the process holds (CPU plans; 0: not known)
    chunk_budget: int = DEFAULT_CHUNK_BUDGET

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq_len

    @property
    def sharded(self) -> bool:
        return self.processes > 1 and self.strategy == "fsdp"

    @property
    def on_cuda(self) -> bool:
        return is_cuda(self.device)


@dataclass(frozen=True)
class Item:
    """One line of the plan: what holds memory at the peak, and how much."""

    key: str
    label: str
    bytes: float
    note: str = ""


@dataclass(frozen=True)
class Suggestion:
    """A change to the recipe (`key=value` words) and the plan's peak with it."""

    change: str
    peak: float
    saving: float
    fits: bool
    note: str = ""


@dataclass
class MemoryPlan:
    """The plan: its lines at the peak, the peak, the budget, and what to change."""

    facts: ModelFacts
    setup: Setup
    items: list[Item]
    peak: float
    phase: str  # where in the step the peak falls
    budget: float | None = None
    budget_source: str = ""
    measured: bool = True  # whether the device's constants were measured
    suggestions: list[Suggestion] = field(default_factory=list)

    @property
    def fits(self) -> bool | None:
        return None if self.budget is None else self.peak <= self.budget

    @property
    def margin(self) -> float | None:
        """Budget minus peak: what is left (negative: what is missing)."""
        return None if self.budget is None else self.budget - self.peak

    def item(self, key: str) -> float:
        """The bytes of one line (0 when the plan has no such line)."""
        return sum(i.bytes for i in self.items if i.key == key)

    def to_dict(self) -> dict:
        setup = {k: v for k, v in self.setup.__dict__.items() if k != "loss_weights"}
        return {
            "model": self.facts.source,
            "setup": setup,
            "items": [dict(i.__dict__) for i in self.items],
            "peak_bytes": self.peak,
            "phase": self.phase,
            "budget_bytes": self.budget,
            "budget_source": self.budget_source,
            "fits": self.fits,
            "margin_bytes": self.margin,
            "measured_constants": self.measured,
            "suggestions": [dict(s.__dict__) for s in self.suggestions],
        }


# ---------------------------------------------------------------------------- the arithmetic


def weight_bytes(facts: ModelFacts) -> dict[str, float]:
    """The frozen base: 4-bit weights, their quantization state, the unquantized layers."""
    p = facts.params
    if not facts.quantized:
        return {
            "quantized": 0.0,
            "quant_state": 0.0,
            "dense": (p.dense + p.quantized) * 1.0 * facts.dense_bytes,
        }
    blocks = p.quantized / NF4_BLOCK
    if facts.double_quant:
        # 8-bit absmax; per tensor, fp32 scales of its absmax (a partial block counted whole),
        # their 256-value code, an offset and the NF4 code.
        nested = 4 * blocks / DOUBLE_QUANT_BLOCK + p.quantized_tensors * (1 + 256 + 1) * 4
        state = blocks + nested + p.quantized_tensors * 16 * 4
    else:
        state = 4 * blocks + p.quantized_tensors * 16 * 4
    return {
        "quantized": p.quantized / 2,
        "quant_state": state,
        "dense": p.dense * 1.0 * facts.dense_bytes,
    }


def optimizer_bytes(params: Parameters, optimizer: str) -> float:
    """AdamW's two moments: fp32 (8 bytes a trainable value), or 8-bit (2 bytes, and a scale per
    256 values) for the tensors bitsandbytes quantizes."""
    tensors = [*params.adapter, params.head]
    if optimizer == "adamw":
        return 8.0 * sum(tensors)
    total = 0.0
    for size in tensors:
        if size >= MIN_8BIT_SIZE:
            total += 2 * size + 2 * 4 * math.ceil(size / OPTIMIZER_BLOCK)
        else:
            total += 8 * size
    return total


def activation_bytes(facts: ModelFacts, setup: Setup, calibration: Calibration) -> dict:
    """Activations of a micro-batch: what one decoder layer saves (`layer`), what is saved at the
    end of the forward pass (`saved`: every layer's, or only the layer inputs with gradient
    checkpointing) and what the layer recomputed in backward holds (`recomputed`)."""
    a = facts.activations
    rows, length = setup.micro_batch, setup.seq_len
    # The stand-in ran on the CPU, where dropout's masks are fp32.
    masks = a.dropout_mask_per_token * (1 - calibration.dropout_mask_bytes / 4)
    layer = a.layer.at(rows, length) - masks * rows * length
    outside = a.outside.at(rows, length)
    if not setup.gradient_checkpointing:
        saved = facts.num_layers * layer + outside
        return {"layer": layer, "saved": saved, "recomputed": 0.0}
    inputs = facts.num_layers * a.input_per_token * rows * length
    return {"layer": layer, "saved": inputs + outside, "recomputed": layer}


def loss_bytes(facts: ModelFacts, setup: Setup) -> dict:
    """The loss at its peak: the chunk's fp32 logits (`chunked.peak_logits`); its inputs and
    their gradient, fp32 `[|S|, target tokens, hidden]` each (the gradient is computed in the
    forward pass and kept for backward)."""
    targets = setup.tokens  # at most: every position of a full micro-batch trained
    if setup.loss_impl == "naive":
        # Full logits through autograd: about 4|S| + 2 fp32 [T, V] tensors (docs/benchmarks.md).
        logits = (4 * setup.num_selected + 2) * targets * facts.vocab_size
    else:
        logits = peak_logits(
            setup.loss_weights,
            setup.num_selected,
            facts.vocab_size,
            has_router=setup.routed,
            tokens=targets,
            chunk_budget=setup.chunk_budget,
            softcapped=facts.softcapped,
        )
    inputs = setup.num_selected * targets * facts.hidden_size * 4.0
    return {"logits": 4.0 * logits, "inputs": inputs}


def plan_memory(
    facts: ModelFacts,
    setup: Setup,
    budget: float | None = None,
    budget_source: str = "",
    calibration: Calibration | None = None,
    suggest: bool = True,
) -> MemoryPlan:
    """The peak memory of one training process with `setup`, line by line; with a budget,
    whether it fits and, when it does not, what to change (`suggestions`)."""
    cal = calibration or CALIBRATION[setup.device]
    p = facts.params
    n = setup.processes
    shard = n if setup.sharded else 1
    split = f"; 1/{n} of it on each of {n} processes (FSDP2)" if setup.sharded else ""
    weights = weight_bytes(facts)
    items: list[Item] = []

    def add(key: str, label: str, value: float, note: str = "") -> None:
        items.append(Item(key, label, float(value), note))

    if facts.quantized:
        add(
            "weights_4bit",
            "4-bit weights",
            weights["quantized"] / shard,
            "NF4, the decoder's linear layers" + split,
        )
        add(
            "quant_state",
            "quantization state",
            weights["quant_state"] / shard,
            "an absmax per 64 weights" + (", double-quantized" if facts.double_quant else ""),
        )
    dense_note = (
        "embeddings, LM head, norms; fp32 (peft's k-bit preparation)"
        if facts.quantized
        else f"every weight, {facts.dense_bytes} bytes each"
    )
    add("dense", "unquantized layers", weights["dense"] / shard, dense_note + split)
    if setup.sharded:
        # Each decoder layer's weights are gathered for its forward and its backward, the next
        # one prefetched; the root unit (embeddings, LM head, norms) stays gathered.
        layer_bytes = p.decoder_layer * (0.5 if facts.quantized else facts.dense_bytes)
        gathered = 2 * layer_bytes + weights["dense"] * (n - 1) / n
        add("gathered", "gathered for compute", gathered, "two decoder layers, the root unit")
    trainable = p.trainable * 4.0 / shard
    add("adapter", "adapter", sum(p.adapter) * 4.0 / shard, "fp32")
    if p.head:
        add("head", "MoDE head", p.head * 4.0 / shard, "per-layer norms and router, fp32")
    add("gradients", "gradients", trainable, "fp32, of the trained weights")
    if n > 1 and not setup.sharded:
        add("buckets", "DDP gradient buckets", trainable, "the all-reduce's copy of the gradients")
    optimizer_note = {
        "adamw": "AdamW: two fp32 moments a weight",
        "adamw_8bit": "8-bit AdamW",
        "paged_adamw_8bit": "paged 8-bit AdamW: can spill to CPU memory",
    }[setup.optimizer]
    add(
        "optimizer", "optimizer states", optimizer_bytes(p, setup.optimizer) / shard, optimizer_note
    )
    if setup.precision == "bf16":
        add("casts", "bf16 copies of the adapter", sum(p.adapter) * 2.0, "autocast's weight cache")

    acts = activation_bytes(facts, setup, cal)
    loss = loss_bytes(facts, setup)
    shape = f"{setup.micro_batch} x {setup.seq_len} tokens"
    forward_end = acts["saved"] + loss["logits"] + 2 * loss["inputs"]
    backward = acts["saved"] + acts["recomputed"] + loss["inputs"]
    if backward > forward_end:
        phase = "backward"
        add(
            "activations",
            "activations",
            acts["saved"],
            f"layer inputs kept by checkpointing, {shape}",
        )
        add(
            "recomputed",
            "one layer recomputed",
            acts["recomputed"],
            "gradient checkpointing's backward",
        )
        add("loss_inputs", "loss: input gradient", loss["inputs"], "fp32, kept for backward")
    else:
        phase = "end of forward"
        if setup.gradient_checkpointing:
            note = f"layer inputs kept by checkpointing, {shape}"
        else:
            note = f"saved for backward by {facts.num_layers} layers, {shape}"
        add("activations", "activations", acts["saved"], note)
        add("logits", "loss: logits chunk", loss["logits"], "fp32, from the chunk budget")
        add("loss_inputs", "loss: inputs and their gradient", 2 * loss["inputs"], "fp32")
    if facts.quantized:
        dequantized = p.largest_quantized * (2 if setup.precision == "bf16" else 4)
        add("dequantized", "a dequantized weight", dequantized, "the largest 4-bit matmul's")
    if cal.tokenizer_per_entry:
        tokenizer = cal.tokenizer_per_entry * facts.vocab_size
        add("tokenizer", "tokenizer", tokenizer, f"{facts.vocab_size:,} entries")
    if setup.data_bytes:
        add("data", "tokenized data", setup.data_bytes, "the training split's memory-mapped tokens")
    add(
        "runtime",
        "CUDA context" if setup.on_cuda else "runtime",
        cal.runtime,
        "" if setup.on_cuda else "threads, libraries",
    )
    add(
        "working",
        "one layer's working memory",
        cal.working_layers * acts["layer"],
        "temporaries and gradients of the layer being computed",
    )
    share = cal.slack_checkpointed if setup.gradient_checkpointing else cal.slack
    if cal.slack_of == "forward":
        basis, what = facts.num_layers * acts["layer"], "what a forward pass allocates"
    else:
        basis, what = max(forward_end, backward), "the step's activations and loss"
    add("slack", "allocator slack", share * basis, f"{share:.0%} of {what}")
    peak = sum(item.bytes for item in items)
    plan = MemoryPlan(facts, setup, items, peak, phase, budget, budget_source, cal.measured)
    if suggest and plan.fits is False:
        plan.suggestions = suggestions(plan, cal)
    return plan


# ---------------------------------------------------------------------------- what to change


def changes(setup: Setup) -> list[tuple[str, Setup]]:
    """One-knob changes that lower the peak, the least intrusive first, each as (`key=value`
    words, the changed setup): a smaller micro-batch keeps the batch through accumulation."""
    found: list[tuple[str, Setup]] = []
    if not setup.gradient_checkpointing:
        found.append(
            ("train.gradient_checkpointing=true", replace(setup, gradient_checkpointing=True))
        )
    if setup.on_cuda and setup.optimizer == "adamw":
        found.append(
            ("train.optimizer=paged_adamw_8bit", replace(setup, optimizer="paged_adamw_8bit"))
        )
    if setup.loss_impl == "naive":
        found.append(("loss.impl=chunked", replace(setup, loss_impl="chunked")))
    for smaller in sorted({setup.micro_batch // 2, 1} - {0, setup.micro_batch}, reverse=True):
        found.append((_micro_batch_words(setup, smaller), _with_micro_batch(setup, smaller)))
    if setup.seq_len > 64:
        shorter = max(64, setup.seq_len // 2)
        found.append((f"data.max_seq_len={shorter}", replace(setup, seq_len=shorter)))
    if setup.num_selected > 2:
        weights = replace(setup.loss_weights, layers=setup.loss_weights.layers[-2:])
        found.append(("layers=last2", replace(setup, num_selected=2, loss_weights=weights)))
    return found


def _with_micro_batch(setup: Setup, size: int) -> Setup:
    accumulation = max(1, setup.grad_accum_steps * setup.micro_batch // size)
    return replace(setup, micro_batch=size, grad_accum_steps=accumulation)


def _micro_batch_words(setup: Setup, size: int) -> str:
    words = f"train.micro_batch_size={size}"
    if (setup.grad_accum_steps * setup.micro_batch) % size == 0:
        words += f" train.grad_accum_steps={setup.grad_accum_steps * setup.micro_batch // size}"
    return words


def suggestions(plan: MemoryPlan, calibration: Calibration) -> list[Suggestion]:
    """What to change when the plan does not fit: each one-knob change with its predicted peak
    and saving, those that fit first, then by saving; when none fits alone, also one combination
    (`combine`)."""

    def peak_of(setup: Setup) -> float:
        return plan_memory(plan.facts, setup, calibration=calibration, suggest=False).peak

    found = []
    for words, changed in changes(plan.setup):
        peak = peak_of(changed)
        if peak < plan.peak:
            found.append(Suggestion(words, peak, plan.peak - peak, peak <= plan.budget))
    found.sort(key=lambda s: (not s.fits, -s.saving))
    if found and not any(s.fits for s in found):
        words, combined = combine(plan.setup, plan.budget, peak_of)
        peak = peak_of(combined)
        fits = peak <= plan.budget
        note = (
            "together"
            if fits
            else (
                "together, and still over: a smaller model, or more processes with "
                "distributed.strategy=fsdp"
            )
        )
        found.append(Suggestion(" ".join(words), peak, plan.peak - peak, fits, note))
    return found


# The changes that cost neither data nor batch: tried first, all together.
FREE_CHANGES = (
    "train.gradient_checkpointing=true",
    "train.optimizer=paged_adamw_8bit",
    "loss.impl=chunked",
)


def combine(
    setup: Setup, budget: float, peak_of: Callable[[Setup], float]
) -> tuple[list[str], Setup]:
    """Changes applied one after another, the least intrusive first, until the plan fits: the
    savers that cost no data (`FREE_CHANGES`), then the largest micro-batch that fits (down to
    1, accumulation keeping the batch), then shorter sequences, then fewer MoDE layers."""
    original = setup
    words: list[str] = []
    for change, changed in changes(original):
        if change in FREE_CHANGES:
            updates = {k: v for k, v in changed.__dict__.items() if getattr(original, k) != v}
            setup = replace(setup, **updates)
            words.append(change)
    if peak_of(setup) > budget and setup.micro_batch > 1:
        fitting = [
            size
            for size in range(setup.micro_batch - 1, 0, -1)
            if peak_of(_with_micro_batch(setup, size)) <= budget
        ]
        size = fitting[0] if fitting else 1
        words.append(_micro_batch_words(setup, size))
        setup = _with_micro_batch(setup, size)
    length = setup.seq_len
    while peak_of(setup) > budget and setup.seq_len > 64:
        setup = replace(setup, seq_len=max(64, setup.seq_len // 2))
    if setup.seq_len != length:
        words.append(f"data.max_seq_len={setup.seq_len}")
    if peak_of(setup) > budget and setup.num_selected > 2:
        weights = replace(setup.loss_weights, layers=setup.loss_weights.layers[-2:])
        setup = replace(setup, num_selected=2, loss_weights=weights)
        words.append("layers=last2")
    return words, setup


def largest_micro_batch(
    facts: ModelFacts,
    setup: Setup,
    budget: float,
    batch_size: int | None = None,
    calibration: Calibration | None = None,
) -> int | None:
    """The largest micro-batch whose plan fits `budget` (None: not even 1). With `batch_size`
    (examples per optimizer step and process), only its divisors, so that gradient accumulation
    keeps it exactly."""
    top = batch_size or AUTO_MAX_MICRO_BATCH
    best = None
    for size in range(1, top + 1):
        if batch_size and batch_size % size:
            continue
        plan = plan_memory(
            facts, replace(setup, micro_batch=size), budget, calibration=calibration, suggest=False
        )
        if plan.peak > budget:
            break
        best = size
    return best


# ---------------------------------------------------------------------------- budgets


UNITS = {
    "": 1,
    "b": 1,
    "k": 2**10,
    "kb": 2**10,
    "kib": 2**10,
    "m": 2**20,
    "mb": 2**20,
    "mib": 2**20,
    "g": 2**30,
    "gb": 2**30,
    "gib": 2**30,
    "t": 2**40,
    "tb": 2**40,
    "tib": 2**40,
}
SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_size(text: str, what: str = "--memory") -> float:
    """A memory size such as `12GB`, `24GiB`, `512MB` or `8e9` in bytes. GB and GiB both mean
    2^30 bytes (as GPU makers and nvidia-smi count); a bare number is bytes."""
    match = SIZE.match(str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in UNITS:
        raise ModeError(
            f"{what}={text!r}: expected a memory size such as 12GB, 24GiB or 512MB "
            "(GB means 2^30 bytes)"
        )
    size = float(match.group(1)) * UNITS[unit]
    if size <= 0:
        raise ModeError(f"{what}={text!r}: expected a size above 0, such as 12GB")
    return size


def check_budget(facts: ModelFacts, setup: Setup, budget: float, what: str = "--memory") -> None:
    """Refuse a budget that cannot hold the frozen weights alone: no knob of the recipe helps.
    `what` is where the budget came from: a setting (`--memory`, `train.memory_budget`) or the
    machine (`available RAM less 10%`)."""
    weights = weight_bytes(facts)
    held = sum(weights.values()) / (setup.processes if setup.sharded else 1)
    if budget < held:
        named = (
            f"{what}={size_text(budget)}"
            if what.startswith(("--", "train."))
            else f"the budget of {size_text(budget)} ({what})"
        )
        raise ModeError(
            f"{named} is below what the model's weights alone take "
            f"({size_text(held)}: 4-bit weights, their quantization state and the unquantized "
            "layers), so no setting of this recipe fits it: give a larger budget, a smaller "
            "model, or more processes with distributed.strategy=fsdp"
        )


def size_text(size: float) -> str:
    """`1.23 GiB`, `456 MiB` or `12 KiB`."""
    if abs(size) >= GIB:
        return f"{size / GIB:.2f} GiB"
    if abs(size) >= MIB:
        return f"{size / MIB:,.0f} MiB"
    return f"{size / 2**10:,.0f} KiB"
