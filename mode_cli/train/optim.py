"""The optimizer and the learning-rate schedule: AdamW over the adapter and the MoDE head, each with
its own learning rate, after a linear warmup.

`train.optimizer`: `adamw` (torch), or bitsandbytes' `adamw_8bit` / `paged_adamw_8bit` (CUDA only:
8-bit states save ~75% of the optimizer memory; paged ones also survive memory spikes). On the CPU
an 8-bit optimizer is refused, or run as torch AdamW with `train.optimizer_fallback=true`. On
FSDP2's sharded parameters it is refused before anything loads (`optimizer_on` says why).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from omegaconf import DictConfig

from mode_cli.devices import is_cuda
from mode_cli.errors import ModeError
from mode_cli.mode.head import MoDEHead

log = logging.getLogger(__name__)

# `train.optimizer`; the 8-bit ones are bitsandbytes' and run on CUDA only.
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit")
GPU_ONLY_OPTIMIZERS = ("adamw_8bit", "paged_adamw_8bit")
# `train.lr_schedule`, after `train.warmup_steps` of linear warmup.
SCHEDULES = ("cosine", "linear", "constant")
# `train.extend`: the schedule of the steps an extension adds (`run_schedule`).
EXTEND_SCHEDULES = ("replan", "restart")


def optimizer_on(name: str, device: str, fallback: bool, sharded: bool = False) -> str:
    """The optimizer that runs on `device` for `train.optimizer=name`: the same one, or AdamW for
    a GPU-only optimizer on the CPU when `fallback` allows it. A ModeError where it cannot run: an
    8-bit optimizer on the CPU without `fallback`, or on FSDP2's shards (`sharded`).

    bitsandbytes' 8-bit step passes each parameter, its gradient and its state to one kernel
    (`torch.ops.bitsandbytes.optimizer_update_8bit_blockwise`). FSDP2 makes every parameter a
    DTensor, and the state bitsandbytes allocates beside it is partly plain tensors (the quantile
    maps, the block maxima, a paged buffer of the whole unsharded shape), so the DTensor dispatcher
    refuses the call ("got mixed torch.Tensor and DTensor"); and the op registers no sharding rule
    that would let it run on shards. tests/test_devices.py checks that this still fails.
    """
    if name not in GPU_ONLY_OPTIMIZERS:
        return name
    if not is_cuda(device):
        if not fallback:
            raise ModeError(
                f"train.optimizer={name} needs a CUDA GPU (bitsandbytes' 8-bit optimizers); on the "
                "CPU use train.optimizer=adamw, train.optimizer_fallback=true (runs it as AdamW), "
                "or train=cpu-smoke to smoke-test a GPU recipe"
            )
        return "adamw"
    if sharded:
        raise ModeError(
            f"train.optimizer={name} cannot update the parameters distributed.strategy=fsdp "
            "shards (bitsandbytes' 8-bit kernels take plain tensors, not FSDP2's DTensor shards). "
            "Use distributed.strategy=ddp to keep the 8-bit optimizer (each GPU holds the whole "
            "4-bit model), or train.optimizer=adamw to keep FSDP (its 32-bit states are sharded "
            "with the parameters)"
        )
    return name


def decays(name: str, param: torch.Tensor) -> bool:
    """Whether weight decay applies to a trainable parameter: matrices yes; vectors no.

    Decay pulls a weight toward 0. For a LoRA matrix that is the regularisation it is meant to
    be; for a bias, a norm's scale or DoRA's magnitude vector (`lora_magnitude_vector`: the
    adapted weight's column norms) it drags the layer toward an output of 0 instead.
    """
    return param.ndim >= 2 and "lora_magnitude_vector" not in name


def make_optimizer(
    cfg: DictConfig, model, head: MoDEHead | None, device: str = "cpu", sharded: bool = False
) -> torch.optim.Optimizer:
    """AdamW over the adapter and the MoDE head, each with its own learning rate.

    Groups, in this order (empty ones left out, so plain LoRA keeps the two groups checkpoints
    expect): the adapter's matrices with `train.weight_decay`; its vectors (DoRA magnitudes,
    biases, norm weights) without; the MoDE head at `train.head_lr`, without.
    """
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {
            "params": [p for n, p in trainable if decays(n, p)],
            "lr": cfg.train.lr,
            "weight_decay": cfg.train.weight_decay,
        },
        {
            "params": [p for n, p in trainable if not decays(n, p)],
            "lr": cfg.train.lr,
            "weight_decay": 0.0,
        },
    ]
    if head is not None:
        groups.append(
            {
                "params": list(head.parameters()),
                "lr": cfg.train.head_lr or cfg.train.lr,
                "weight_decay": 0.0,
            }
        )
    groups = [group for group in groups if group["params"]]  # mode-only has no adapter
    name = optimizer_on(cfg.train.optimizer, device, cfg.train.optimizer_fallback, sharded)
    if name != cfg.train.optimizer:
        log.info(
            f"note: train.optimizer={cfg.train.optimizer} needs CUDA; using torch AdamW on the {device}"
        )
    if name == "adamw":
        return torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8)
    import bitsandbytes as bnb

    optimizer_class = {
        "adamw_8bit": bnb.optim.AdamW8bit,
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
    }[name]
    return optimizer_class(groups, betas=(0.9, 0.999), eps=1e-8)


def lr_lambda(warmup: int, total: int, min_ratio: float, schedule: str = "cosine"):
    """The LR factor of scheduler step `step` (0-based): linear warmup to the peak over `warmup`
    steps, then `cosine` or `linear` decay to `min_ratio`, or `constant`.

    The decay reaches its floor at step `total`, one past the last (`total - 1`): with the
    default floor of 0, a floor at the last step would make it a forward and backward pass that
    updates nothing."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "linear":
            return min_ratio + (1 - min_ratio) * (1 - progress)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def run_schedule(train: DictConfig) -> Callable[[int], float]:
    """The LR factor of every scheduler step of the run, its extensions included.

    Up to the first extension the schedule is the one planned for the run's first budget. From an
    extension's `from_step` on (the first added step reads the factor of scheduler step
    `from_step`), the factor follows that extension's schedule:

    - `replan`: the recipe's schedule as if `max_steps` had been the extension's budget from the
      start, continued at the current step (with a constant schedule, exactly what a run planned
      for that budget from the start does);
    - `restart`: a new warmup of `train.warmup_steps` then the decay, over the added steps alone.
    """

    def planned(total: int) -> Callable[[int], float]:
        return lr_lambda(train.warmup_steps, total, train.min_lr_ratio, train.lr_schedule)

    extensions = list(train.extensions)
    first_budget = extensions[0].from_max_steps if extensions else train.max_steps
    segments: list[tuple[int, Callable[[int], float]]] = [(0, planned(first_budget))]
    for extension in extensions:
        start = extension.from_step
        if extension.schedule == "restart":
            fresh = planned(extension.max_steps - start)
            segments.append((start, lambda step, fresh=fresh, start=start: fresh(step - start)))
        else:
            segments.append((start, planned(extension.max_steps)))

    def factor(step: int) -> float:
        for start, segment in reversed(segments):
            if step >= start:
                return segment(step)
        return segments[0][1](step)

    return factor


def make_scheduler(cfg: DictConfig, optimizer: torch.optim.Optimizer):
    """The recipe's schedule (`run_schedule`: its extensions included) as a LambdaLR over every
    parameter group."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, run_schedule(cfg.train))


def reschedule(scheduler) -> None:
    """After loading a checkpoint's schedule state into a scheduler whose schedule changed (an
    extension): the learning rate of the next step from the new schedule, not the one the
    checkpoint's optimizer state recorded from the old. Stepping back one step and forward again
    recomputes it through torch's own path (every group's lr, `get_last_lr`)."""
    scheduler.last_epoch -= 1
    scheduler.step()
