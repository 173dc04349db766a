"""Several processes, one run: data parallelism on torch.distributed, under torchrun.

Every process (rank) loads and quantizes the base itself (bitsandbytes' quantization state does not
travel in a broadcast), reads its shard of every global micro-batch, and runs the forward through
one wrapped module, `steps.TrainingModule` (model + MoDE head, whose forward returns the loss
sums), so the wrapper's gradient synchronisation sees every trainable parameter. Strategies
(`distributed.strategy`):

- `ddp`: DistributedDataParallel; every rank holds the whole model, gradients are averaged.
- `fsdp`: FSDP2 (`fully_shard`): one unit per decoder layer and a root unit holding the
  embeddings, the LM head, the MoDE head and the loss (the chunked loss reads `lm_head.weight`
  directly, which works only while the root's parameters are gathered). 4-bit weights shard as
  their uint8 storage; a model too large for one device in 4 bits trains across several.

The loss of a step is normalised by the target tokens of the whole step on every rank together
(an all-reduce), so N ranks with micro-batch b give the update of one process with micro-batch
N x b. Stop decisions (signals, time and step budgets, a non-finite loss) are agreed every step.
Checkpoints go through `torch.distributed.checkpoint.state_dict` and are written by rank 0 in the
single-process format, so a run resumes with any world size that keeps the global batch.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from mode_cli.devices import collective_backend, is_cuda, rank_device
from mode_cli.errors import ModeError

# `distributed.strategy`.
STRATEGIES = ("ddp", "fsdp")
# The environment torchrun gives each process.
WORLD_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
# What else a rank of a job started without torchrun needs to find its peers (env:// rendezvous).
RENDEZVOUS_ENV = ("MASTER_ADDR", "MASTER_PORT")


def launched_by_torchrun() -> bool:
    """Whether this process is a rank of a torchrun job: several processes, or one that torchrun
    started (a one-GPU FSDP job still runs the sharded code).

    A WORLD_SIZE above 1 without the rest of a rank's environment (some clusters export it to
    every command) is refused, naming what is missing: guessing would let several copies of one
    command each train alone into the same run folder.
    """
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return True
    size = os.environ.get("WORLD_SIZE", "1")
    if not size.strip().isdigit():
        raise ModeError(f"WORLD_SIZE={size}: expected a number of processes")
    if int(size) <= 1:
        return False
    missing = [name for name in (*WORLD_ENV, *RENDEZVOUS_ENV) if name not in os.environ]
    if missing:
        raise ModeError(
            f"WORLD_SIZE={size} is set, but not {', '.join(missing)}: this process is not a rank "
            "of a torch.distributed job. Start the job with torchrun (or distributed.nproc=N), "
            "or unset WORLD_SIZE to train in one process"
        )
    return True


def restarted_by_torchrun() -> bool:
    """Whether torchrun restarted this job after a failure (`distributed.max_restarts`): it reruns
    the command as it was started."""
    return os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") not in ("", "0")


def shards(strategy: str, nproc: int) -> bool:
    """Whether a run with `distributed.strategy` and `distributed.nproc` will shard its model:
    FSDP over several processes, or under a torchrun (a one-process torchrun job runs the sharded
    code too). `mode train distributed.nproc=1` alone is one plain process whatever the strategy,
    as `World.sharded` says once the run has started."""
    return strategy == "fsdp" and (nproc > 1 or launched_by_torchrun())


@dataclass(frozen=True)
class World:
    """This process's place in the job; a single process is rank 0 of a world of 1, for which
    every collective below is a no-op."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    strategy: str = "ddp"
    joined: bool = False  # a process group exists (torchrun started this process)

    @property
    def distributed(self) -> bool:
        """Whether the collectives and the strategy's wrapper are real (a job of one rank under
        torchrun included)."""
        return self.size > 1 or self.joined

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes logs, metrics, checkpoints and reports."""
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.distributed and self.strategy == "fsdp"

    def device(self, device: str) -> str:
        """This rank's device: `cuda:<local rank>` on CUDA, the CPU otherwise."""
        return rank_device(device, self.local_rank)

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (float64, exact for token counts)."""
        if not self.distributed:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self.collective_device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def max(self, value: int) -> int:
        """The largest of the ranks' values."""
        if not self.distributed:
            return value
        tensor = torch.tensor([value], dtype=torch.int64, device=self.collective_device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return int(tensor.item())

    def broadcast(self, value):
        """Rank 0's value of a picklable object, on every rank."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value) -> list | None:
        """Every rank's value of a picklable object, on rank 0 (None elsewhere)."""
        if not self.distributed:
            return [value]
        out = [None] * self.size if self.main else None
        dist.gather_object(value, out, dst=0)
        return out

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    @property
    def collective_device(self) -> torch.device:
        """Where small collective tensors live: NCCL wants them on the rank's GPU."""
        if dist.get_backend() == "nccl":
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")


def init_world(strategy: str, timeout_s: float, device: str) -> World:
    """Join the torchrun job this process belongs to (or stand alone: a world of 1).

    The collective timeout is `timeout_s`: a rank left waiting for a dead peer gives up after it,
    not after torch's default 30 minutes (torchrun itself stops the job as soon as a rank dies).
    """
    if not launched_by_torchrun():
        return World(strategy=strategy)
    rank, size, local = (int(os.environ[name]) for name in WORLD_ENV)
    if not dist.is_initialized():
        if is_cuda(device):
            torch.cuda.set_device(local)
        dist.init_process_group(collective_backend(device), timeout=timedelta(seconds=timeout_s))
    return World(rank=rank, size=size, local_rank=local, strategy=strategy, joined=True)


def close_world(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------- the wrapped module


def wrap(module: nn.Module, world: World) -> nn.Module:
    """The training module (`steps.TrainingModule`: `.model`, `.head`) under the world's
    strategy: itself for one process, DDP or FSDP2 for several."""
    if not world.distributed:
        return module
    if world.strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        from mode_cli.models import families

        base = families.base_of(module.model)
        for layer in families.get_attr(base, families.family_of(base).layers):
            fully_shard(layer)
        fully_shard(module)  # the root unit: embeddings, final norm, LM head, MoDE head
        return module
    from torch.nn.parallel import DistributedDataParallel

    # Only the trainable parameters are synchronised; the frozen base is the same on every rank
    # (each loaded and quantized it from the same files), and DDP's start-up broadcast would copy
    # packed 4-bit bytes without their quantization state.
    frozen = [name for name, p in module.named_parameters() if not p.requires_grad]
    frozen += [name for name, _ in module.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, frozen)
    device_ids = (
        [world.local_rank] if torch.cuda.is_available() and dist.get_backend() == "nccl" else None
    )
    return DistributedDataParallel(module, device_ids=device_ids)


def gradient_sync(wrapped: nn.Module, world: World, sync: bool):
    """Synchronise gradients only on the last micro-batch of a step (the others accumulate)."""
    if not world.distributed or sync:
        return nullcontext()
    if world.strategy == "fsdp":
        return _fsdp_no_sync(wrapped)
    return wrapped.no_sync()


@contextmanager
def _fsdp_no_sync(module: nn.Module) -> Iterator[None]:
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


@contextmanager
def gathered(module: nn.Module, world: World) -> Iterator[None]:
    """Outside the wrapper's forward (evaluation), the root unit's parameters gathered; each
    decoder layer gathers its own when called. A no-op unless sharded."""
    if not world.sharded:
        yield
        return
    # FSDP2 makes the first unit to run forward the root. Before any training step (the eval at
    # step 0 of a run from init_from) a decoder layer would be first, and the wrapper's own
    # forward would then fail ("already lazily initialized"): the wrapper takes the root's place
    # first. torch has no public call for it (unshard() is not it).
    module._get_fsdp_state()._lazy_init()
    module.unshard()
    try:
        yield
    finally:
        module.reshard()


# ---------------------------------------------------------------------------- checkpoint state


def _options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def trainable_state(module: nn.Module, world: World) -> tuple[dict, dict | None] | None:
    """(the adapter's trainable parameters by name, the MoDE head's state dict), full and on the
    CPU, in the single-process checkpoint's naming. Called on every rank; None except on rank 0
    when sharded (gathering is collective)."""
    if not world.sharded:
        adapter = {
            name: p.detach().contiguous().cpu()
            for name, p in module.model.named_parameters()
            if p.requires_grad
        }
        head = None
        if module.head is not None:
            head = {k: v.detach().contiguous().cpu() for k, v in module.head.state_dict().items()}
        return adapter, head
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    full = get_model_state_dict(
        module, options=_options(cpu_offload=True, ignore_frozen_params=True)
    )
    if not world.main:
        return None
    adapter = {
        name[len("model.") :]: value.contiguous()
        for name, value in full.items()
        if name.startswith("model.")
    }
    head = None
    if module.head is not None:
        head = {
            name[len("head.") :]: value.contiguous()
            for name, value in full.items()
            if name.startswith("head.")
        }
    return adapter, head


def load_trainable_state(module: nn.Module, world: World, adapter: dict, head: dict | None) -> None:
    """Put checkpointed trainable weights (single-process naming, full tensors) into the model and
    head, sharding them where the strategy shards."""
    full = {f"model.{name}": value for name, value in adapter.items()}
    if head is not None:
        full.update({f"head.{name}": value for name, value in head.items()})
    if world.sharded:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(module, full, options=_options(strict=False))
        return
    with torch.no_grad():
        params = dict(module.model.named_parameters())
        for name, value in adapter.items():
            params[name].copy_(value)
    if module.head is not None and head is not None:
        module.head.load_state_dict(head)


def optimizer_state(module: nn.Module, optimizer, world: World) -> dict | None:
    """The optimizer's state in torch's own format (parameters numbered in group order), as a
    single process saves it. Called on every rank; None except on rank 0 when sharded."""
    if not world.sharded:
        return optimizer.state_dict()
    if not optimizer.state:
        # Before the first update (a checkpoint after skipped steps): torch's
        # get_optimizer_state_dict would give the optimizer a state by a fake step (AdamW at step
        # 1 with zero moments), and the next real update would differ from one process's. An
        # empty state is the same on every rank, and numbered as one process numbers it.
        return optimizer.state_dict() if world.main else None
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    by_name = get_optimizer_state_dict(module, optimizer, options=_options(cpu_offload=True))
    if not world.main:
        return None
    index = {name: i for i, name in enumerate(_names_in_order(by_name))}
    return {
        "state": {index[name]: value for name, value in by_name["state"].items()},
        "param_groups": [
            {**group, "params": [index[name] for name in group["params"]]}
            for group in by_name["param_groups"]
        ],
    }


def load_optimizer_state(module: nn.Module, optimizer, world: World, saved: dict) -> None:
    """Load an optimizer state saved in torch's own format (by `optimizer_state` or a single
    process), sharding it where the strategy shards."""
    if not world.sharded or not saved["state"]:
        # An empty state (saved before the first update) has nothing to shard, and torch's own
        # loader would first give the optimizer a state by a fake step (see `optimizer_state`).
        optimizer.load_state_dict(saved)
        return
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    # The parameter names in group order, which is the order a single process numbers them in.
    current = get_optimizer_state_dict(module, optimizer, options=_options(cpu_offload=True))
    names = world.broadcast(_names_in_order(current) if world.main else None)
    by_name = {
        "state": {names[i]: value for i, value in saved["state"].items()},
        "param_groups": [
            {**group, "params": [names[i] for i in group["params"]]}
            for group in saved["param_groups"]
        ],
    }
    set_optimizer_state_dict(module, optimizer, by_name, options=_options())


def _names_in_order(by_name: dict) -> list[str]:
    return [name for group in by_name["param_groups"] for name in group["params"]]


# ---------------------------------------------------------------------------- starting the job


@dataclass(frozen=True)
class LaunchResult:
    """How a job `launch` started ended: its exit code, and for a failure, which rank failed
    first and how (`rank 1: killed by SIGKILL`); None when every rank ended cleanly or stopped
    as asked."""

    exit_code: int
    failure: str | None = None


def launch(
    nproc: int, args: list[str], *, max_restarts: int = 0, grace_s: float = 60
) -> LaunchResult:
    """Run `python -m mode_cli <args>` as `nproc` ranks on this machine under torchrun's engine
    (torch.distributed's elastic agent, what `torchrun --standalone` runs), and wait for the job.

    A rank that dies ends the job at once (the agent stops the others). Ctrl-C or SIGTERM to this
    process is passed to every rank, which stop after the same step with a checkpoint, given
    `grace_s` to do so. With `max_restarts`, a failed job starts again from scratch (the command
    must resume: the caller adds `resume=auto`).
    """
    import signal
    import sys
    import uuid

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if max_restarts:
        # Re-rendezvous on a restart fails on gloo while the agent shares its TCP store.
        os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=max_restarts,
        monitor_interval=0.5,
        shutdown_timeout=int(grace_s),
    )
    try:
        elastic_launch(config, sys.executable)("-m", "mode_cli", *args)
    except SignalException as err:
        return LaunchResult(128 + int(err.sigval))
    except ChildFailedError as err:
        rank, first = err.get_first_failure()
        codes = {failure.exitcode for failure in err.failures.values()}
        # A rank refused the run (a ModeError: it said why). The others stopped because of it,
        # however they ended (143 after their step, killed by the agent's SIGTERM, or failing in a
        # collective their peer left), so the job's status is the refusal's. Exit 2 is never such
        # a consequence: a rank refuses only on its own checks.
        if 2 in codes:
            return LaunchResult(2)
        # Every rank stopped as asked (a signal to one rank, agreed by all): each said so already.
        if codes <= {128 + signal.SIGINT, 128 + signal.SIGTERM}:
            return LaunchResult(max(codes))
        if first.exitcode < 0:
            how = f"killed by {signal.Signals(-first.exitcode).name}"
        else:
            how = f"exit code {first.exitcode}"
        return LaunchResult(1, f"rank {rank} failed first ({how}); the other ranks were stopped")
    return LaunchResult(0)
