"""What one training process does with its hardware, decided from the recipe, the process's place
in the job and the machine, before anything is loaded: the device it trains on, how the processes
talk, whether the model is sharded, the optimizer that runs, the compute and autocast dtypes, how
the frozen base is quantized and placed, and what an out-of-memory error says.

`FinetuneRecipe` takes each of these from `plan_run` and nowhere else, so deciding them is enough
to know what a run will do: tests/test_devices.py decides them for every shipped recipe and
`train=` option, one and several processes, on a simulated GPU machine on the CPU.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from mode_cli.devices import Machine, collective_backend, describe, device_type, is_cuda
from mode_cli.models.loading import base_placement, compute_dtype
from mode_cli.train.distributed import World
from mode_cli.train.optim import optimizer_on


@dataclass(frozen=True)
class RunPlan:
    """One process's device choices (`plan_run`).

    Attributes:
        device: where it trains: `cuda:<local rank>` on GPUs (`cuda:0` alone), `cpu`.
        backend: torch.distributed's backend between the processes (NCCL on GPUs, gloo on CPUs).
        sharded: whether FSDP shards the model over the processes.
        optimizer: the optimizer that runs: `train.optimizer`, or `adamw` where the CPU fallback
            applies.
        compute_dtype: the trainable weights' dtype and the 4-bit layers' compute dtype.
        autocast_dtype: the forward's autocast dtype on `device`; None for fp32 (no autocast).
        base: how the frozen base loads (`loading.base_placement`): its dtype, and for NF4
            bitsandbytes' settings and the device map.
    """

    device: str
    backend: str
    sharded: bool
    optimizer: str
    compute_dtype: torch.dtype
    autocast_dtype: torch.dtype | None
    base: dict

    @property
    def on_cuda(self) -> bool:
        return is_cuda(self.device)

    def autocast(self):
        """The context the forward runs in: autocast to `autocast_dtype` on this device's type."""
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=device_type(self.device), dtype=self.autocast_dtype)

    def summary(self) -> str:
        """The choices as the start of a run prints them."""
        precision = "bf16 autocast" if self.autocast_dtype == torch.bfloat16 else "fp32"
        return f"device {self.device}, {self.optimizer}, {precision}"

    def out_of_memory(self, cfg: DictConfig, step: int, last_checkpoint: Path | None) -> str:
        """What an out-of-memory error at `step` says: where, and the settings that lower memory."""
        where = f"GPU memory on {describe(self.device)}" if self.on_cuda else "memory on the CPU"
        return (
            f"out of {where} at step {step}. Lower memory with train.micro_batch_size "
            f"(now {cfg.train.micro_batch_size}; raise train.grad_accum_steps to keep the batch), "
            f"data.max_seq_len (now {cfg.data.max_seq_len}) or "
            f"train.gradient_checkpointing=true (now {str(cfg.train.gradient_checkpointing).lower()}"
            "; a run can be resumed with it changed). Last checkpoint: "
            f"{last_checkpoint or 'none'}"
        )


def plan_run(cfg: DictConfig, world: World, machine: Machine | None = None) -> RunPlan:
    """The device choices of the process `world` describes, for a validated recipe, on `machine`
    (what torch sees of this one by default)."""
    machine = machine or Machine.current()
    device = world.device(machine.resolve(cfg.train.device))
    precision = cfg.train.precision
    dtype = compute_dtype(precision)
    return RunPlan(
        device=device,
        backend=collective_backend(device),
        sharded=world.sharded,
        optimizer=optimizer_on(
            cfg.train.optimizer, device, cfg.train.optimizer_fallback, world.sharded
        ),
        compute_dtype=dtype,
        autocast_dtype=None if dtype == torch.float32 else dtype,
        base=base_placement(cfg.model, precision, device),
    )
