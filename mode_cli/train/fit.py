"""Will a recipe fit? Its memory plan on a budget (`mode plan`, `mode train --dry-run`), and
`train.micro_batch_size=auto` resolved before a run starts.

The arithmetic is `memory.py`'s, on what `footprint.py` reads from the model's config.json; here
the recipe, the device and the budget meet: the budget the user names (`--memory 12GB`,
`train.memory_budget`) or the machine's own (its GPU, else its RAM), and on CUDA one real step
that confirms the size `auto` chose (halved on an out-of-memory error, as Lightning's
BatchSizeFinder does).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from omegaconf import DictConfig

from mode_cli.config import method
from mode_cli.devices import device_type, gpu_memory, is_cuda, resolve_device
from mode_cli.errors import ModeError
from mode_cli.train.memory import (
    AUTO_MARGIN,
    MemoryPlan,
    ModelFacts,
    Setup,
    check_budget,
    largest_micro_batch,
    parse_size,
    plan_memory,
    size_text,
)

# Bytes a training token costs in the process: the data cache's memory-mapped token ids (2 bytes,
# 4 above a vocabulary of 65,536) and trained flags (1 byte), every page of which a run touches
# once an epoch; a byte to spare for the per-example arrays (lengths, offsets, digests).
DATA_BYTES_PER_TOKEN = 2 + 1 + 1


def recipe_device(cfg: DictConfig) -> str:
    """The type (`cpu`, `cuda`) of the device the recipe trains on."""
    return device_type(resolve_device(cfg.train.device))


def machine_budget(device: str, free: bool) -> tuple[float | None, str]:
    """This machine's memory for `device`: the GPU's (GPU 0) or the RAM; `free`: what is free
    now, less `AUTO_MARGIN`; else all of it. (None, why) when the device is not here."""
    if is_cuda(device):
        found = gpu_memory(device)
        if found is None:
            return None, "no GPU on this machine: name a budget with --memory"
        available, total, name = found
        if free:
            return available * (1 - AUTO_MARGIN), f"{name}'s free memory less {AUTO_MARGIN:.0%}"
        return float(total), f"this machine's GPU ({name})"
    info = meminfo()
    if free:
        return info["MemAvailable"] * (1 - AUTO_MARGIN), f"available RAM less {AUTO_MARGIN:.0%}"
    return float(info["MemTotal"]), "this machine's RAM"


def meminfo() -> dict[str, float]:
    """/proc/meminfo in bytes (Linux); elsewhere, torch's view of nothing: an error."""
    path = Path("/proc/meminfo")
    if not path.is_file():
        raise ModeError("this machine's RAM is unknown here: name a budget with --memory")
    values = {}
    for line in path.read_text().splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts:
            values[key] = float(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return values


def recipe_setup(
    cfg: DictConfig, facts: ModelFacts, device: str, processes: int = 1, data_bytes: float = 0.0
) -> Setup:
    """The plan's view of a composed recipe on a device type (`micro_batch_size=auto`: 1 until
    resolved)."""
    from mode_cli.mode.weighting import loss_weights
    from mode_cli.train.heads import selected_layers
    from mode_cli.train.optim import optimizer_on

    layers = selected_layers(cfg, facts.num_layers)
    micro = cfg.train.micro_batch_size
    return Setup(
        micro_batch=1 if micro == "auto" else int(micro),
        seq_len=cfg.data.max_seq_len,
        gradient_checkpointing=cfg.train.gradient_checkpointing,
        # On a CPU an 8-bit optimizer runs as AdamW (train.optimizer_fallback), or is refused.
        optimizer=optimizer_on(cfg.train.optimizer, device, True),
        precision=cfg.train.precision,
        device=device,
        loss_weights=loss_weights(cfg.loss, layers, 1, cfg.train.max_steps),
        num_selected=max(1, len(layers)),
        routed=method(cfg).routed,
        loss_impl=cfg.loss.impl,
        processes=processes,
        strategy=cfg.distributed.strategy,
        grad_accum_steps=cfg.train.grad_accum_steps,
        # Tokenizer and data live in the host's memory: a CUDA plan is the GPU's.
        data_bytes=0.0 if is_cuda(device) else data_bytes,
    )


def data_bytes(tokens: int) -> float:
    """What the training split's `tokens` take in the process (its memory-mapped arrays)."""
    return float(tokens * DATA_BYTES_PER_TOKEN)


@dataclass(frozen=True)
class AutoChoice:
    """`train.micro_batch_size=auto` resolved: the size, the accumulation that keeps the batch,
    and the plan at that size."""

    micro_batch: int
    grad_accum_steps: int
    plan: MemoryPlan


def plan_recipe(
    cfg: DictConfig,
    memory: str | None = None,
    processes: int | None = None,
    facts: ModelFacts | None = None,
    data: float = 0.0,
) -> tuple[MemoryPlan, AutoChoice | None]:
    """The recipe's plan on `memory` (a size; None: `train.memory_budget`, else this machine's
    GPU, else its RAM; with micro_batch_size=auto, their free memory less a margin, as the run
    would), per process of `processes` (default: `distributed.nproc`). With auto, the plan at
    the size auto picks on that budget, and the choice."""
    from mode_cli.train.footprint import model_facts

    device = recipe_device(cfg)
    processes = processes or cfg.distributed.nproc
    facts = facts or model_facts(cfg)
    setup = recipe_setup(cfg, facts, device, processes, data)
    auto = cfg.train.micro_batch_size == "auto"
    # auto plans on what the run itself would use: the free memory, less a margin.
    budget, source = recipe_budget(cfg, memory, free=auto)
    if memory is not None or cfg.train.memory_budget is not None:
        check_budget(facts, setup, budget, source)
    choice = None
    if auto and budget is not None:
        choice = choose_micro_batch(cfg, facts, setup, budget, source)
        setup = replace(setup, micro_batch=choice.micro_batch)
    return plan_memory(facts, setup, budget, source), choice


def choose_micro_batch(
    cfg: DictConfig, facts: ModelFacts, setup: Setup, budget: float, source: str
) -> AutoChoice:
    """The largest micro-batch the plan fits into `budget`, a divisor of `train.batch_size`
    when it is set (gradient accumulation makes up the rest)."""
    check_budget(facts, setup, budget, source)
    batch = cfg.train.batch_size
    best = largest_micro_batch(facts, setup, budget, batch)
    if best is None:
        at_one = plan_memory(facts, replace(setup, micro_batch=1), budget, source)
        tips = [s.change for s in at_one.suggestions if "micro_batch_size" not in s.change]
        raise ModeError(
            f"train.micro_batch_size=auto: even a micro-batch of 1 needs "
            f"{size_text(at_one.peak)}, over the budget of {size_text(budget)} ({source})"
            + (f"; try {' or '.join(tips)}" if tips else "")
        )
    accum = accumulation(cfg, best)
    plan = plan_memory(
        facts, replace(setup, micro_batch=best, grad_accum_steps=accum), budget, source
    )
    return AutoChoice(best, accum, plan)


def accumulation(cfg: DictConfig, micro_batch: int) -> int:
    """Gradient accumulation at `micro_batch`: what keeps `train.batch_size` when it is set, else
    the recipe's `train.grad_accum_steps`."""
    batch = cfg.train.batch_size
    return batch // micro_batch if batch else cfg.train.grad_accum_steps


def recipe_budget(
    cfg: DictConfig, memory: str | None = None, free: bool = False
) -> tuple[float | None, str]:
    """The budget a plan of the recipe fits into, and where it came from: `memory` (`--memory`),
    else `train.memory_budget`, else this machine's memory for the recipe's device
    (`machine_budget`; None when the device is not here)."""
    if memory is not None:
        return parse_size(memory), "--memory"
    if cfg.train.memory_budget is not None:
        return parse_size(cfg.train.memory_budget, "train.memory_budget"), "train.memory_budget"
    return machine_budget(recipe_device(cfg), free)


def auto_budget(cfg: DictConfig) -> tuple[float, str]:
    """The budget of `train.micro_batch_size=auto`: `train.memory_budget`, else the device's
    free memory less a margin."""
    budget, source = recipe_budget(cfg, free=True)
    if budget is None:
        raise ModeError(f"train.micro_batch_size=auto: {source}")
    return budget, source


def confirm_micro_batch(
    try_step: Callable[[int], None],
    size: int,
    batch_size: int | None = None,
    agree: Callable[[bool], bool] = lambda failed: failed,
    on_retry: Callable[[], None] = lambda: None,
) -> int:
    """The size that survives one real step: `try_step(size)`, halved (to a divisor of
    `batch_size` when set) after each out-of-memory error until one passes.

    `agree` turns this process's outcome into the job's (any rank out of memory: all halve);
    `on_retry` frees what the failed step held (the CUDA cache)."""
    while True:
        failed = False
        try:
            try_step(size)
        except torch.OutOfMemoryError:
            failed = True
        if not agree(failed):
            return size
        on_retry()
        if size == 1:
            raise ModeError(
                "train.micro_batch_size=auto: a micro-batch of 1 ran out of memory in its probe "
                "step (the plan thought it fits); lower data.max_seq_len or set "
                "train.gradient_checkpointing=true"
            )
        size = max(d for d in range(1, size // 2 + 1) if not batch_size or batch_size % d == 0)


# ---------------------------------------------------------------------------- rendering


def render_plan(plan: MemoryPlan, recipe: str, choice: AutoChoice | None = None):
    """The plan as rich renderables for a console: a heading, its lines, the verdict, and what
    to change."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    s = plan.setup
    processes = f", {s.processes} processes ({s.strategy}), per process" if s.processes > 1 else ""
    heading = Text.assemble(
        ("memory plan", "bold"),
        f" of {recipe} on {s.device}{processes}: {plan.facts.source}\n",
        f"micro-batch {s.micro_batch} x {s.seq_len} tokens, gradient checkpointing "
        f"{'on' if s.gradient_checkpointing else 'off'}, {s.optimizer}, {s.precision}",
    )
    if choice is not None:
        heading.append(
            f"\ntrain.micro_batch_size=auto: {choice.micro_batch} (train.grad_accum_steps "
            f"{choice.grad_accum_steps})"
        )
    table = Table(box=None, show_edge=False, pad_edge=False)
    table.add_column("at the peak", no_wrap=True)
    table.add_column("memory", no_wrap=True, justify="right")
    table.add_column("")
    for item in plan.items:
        if item.bytes:
            table.add_row(item.label, size_text(item.bytes), Text(item.note, style="dim"))
    table.add_row(
        Text(f"peak ({plan.phase})", style="bold"), Text(size_text(plan.peak), style="bold"), ""
    )
    parts = [heading, table]
    if not plan.measured:
        parts.append(
            Text(
                f"The {s.device.upper()} constants (context, allocator slack) are estimates, not "
                "yet measured (docs/benchmarks.md).",
                style="dim",
            )
        )
    if plan.budget is None:
        parts.append(Text(plan.budget_source))
        return Group(*parts)
    margin = plan.margin
    verdict = Text.assemble(
        ("fits" if plan.fits else "does not fit", "bold green" if plan.fits else "bold red"),
        f" in {size_text(plan.budget)} ({plan.budget_source}): ",
        f"{size_text(margin)} to spare" if plan.fits else f"{size_text(-margin)} over",
    )
    parts.append(verdict)
    if plan.suggestions:
        tips = Table(box=None, show_edge=False, pad_edge=False)
        tips.add_column("peak", no_wrap=True, justify="right")
        tips.add_column("saving", no_wrap=True, justify="right")
        tips.add_column("", no_wrap=True)
        tips.add_column("change")
        for tip in plan.suggestions:
            verdict = "fits" if tip.fits else "over"
            change = tip.change + (f" ({tip.note})" if tip.note else "")
            tips.add_row(
                size_text(tip.peak),
                size_text(tip.saving),
                Text(verdict, style="green" if tip.fits else "red"),
                change,
            )
        parts += [Text("to make it fit, change:", style="bold"), tips]
    return Group(*parts)
