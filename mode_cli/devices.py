"""What a device string means, decided in one place.

`train.device` is `auto`, `cpu` or `cuda`; a process of a job trains on `cuda:<local rank>`, and a
single process on `cuda:0`. Code that decides by device asks here (`is_cuda(device)`) and never
compares the strings itself: `"cuda:0" == "cuda"` is False, so such a comparison quietly takes a
process on a GPU for one without (and, say, refuses its 8-bit optimizer). Every CUDA query a decision reads (is there a GPU, how
many, which one, its memory, its RNG state) goes through these functions too, so a test that makes
torch report a GPU machine sees the decisions a GPU run makes (tests/test_devices.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# `train.device`: `auto` is CUDA when torch sees a GPU, else the CPU.
DEVICES = ("auto", "cpu", "cuda")


def device_type(device: str | torch.device) -> str:
    """The kind of device, without its index: `cuda` for `cuda`, `cuda:3` or
    torch.device("cuda", 3); `cpu` for the CPU."""
    return torch.device(device).type


def is_cuda(device: str | torch.device) -> bool:
    """Whether `device` is a CUDA GPU, with or without an index."""
    return device_type(device) == "cuda"


def cuda_index(device: str | torch.device) -> int:
    """The GPU a CUDA device names; `cuda` alone is GPU 0, the first one this process sees."""
    return torch.device(device).index or 0


@dataclass(frozen=True)
class Machine:
    """What torch sees of this machine's accelerators: the facts device decisions read."""

    gpus: int = 0

    @classmethod
    def current(cls) -> Machine:
        # Counting GPUs creates no CUDA context: a launcher that only decides stays off the GPUs.
        return cls(gpus=torch.cuda.device_count() if torch.cuda.is_available() else 0)

    def resolve(self, requested: str) -> str:
        """`train.device` as a device: `auto` is CUDA when there is a GPU, else the CPU."""
        if requested != "auto":
            return requested
        return "cuda" if self.gpus else "cpu"


def resolve_device(requested: str) -> str:
    """`auto` means CUDA when torch sees a GPU, else the CPU."""
    return Machine.current().resolve(requested)


def rank_device(device: str, local_rank: int) -> str:
    """The device of the process with this local rank: its own GPU on CUDA, else the CPU."""
    return f"cuda:{local_rank}" if is_cuda(device) else device


def collective_backend(device: str) -> str:
    """torch.distributed's backend for processes on `device`: NCCL between GPUs, gloo on CPUs."""
    return "nccl" if is_cuda(device) else "gloo"


def describe(device: str) -> str:
    """The device as a message names it: `cuda:1 (NVIDIA H100 80GB HBM3, 85.0 GB)`, `the CPU`."""
    if not is_cuda(device):
        return "the CPU"
    props = torch.cuda.get_device_properties(cuda_index(device))
    return f"{device} ({props.name}, {props.total_memory / 1e9:.1f} GB)"


def gpu_memory(device: str) -> tuple[float, float, str] | None:
    """The free and total memory (bytes) of the GPU `device` names, and its name; None without
    a GPU."""
    if not is_cuda(device) or not Machine.current().gpus:
        return None
    index = cuda_index(device)
    free, total = torch.cuda.mem_get_info(index)
    return float(free), float(total), torch.cuda.get_device_name(index)


def empty_cache(device: str) -> None:
    """Return the CUDA allocator's cached blocks (after a model is freed); nothing on a CPU."""
    if is_cuda(device):
        torch.cuda.empty_cache()


def peak_memory_bytes(device: str) -> int | None:
    """This process's peak allocated memory on its GPU; None on a CPU."""
    return torch.cuda.max_memory_allocated(cuda_index(device)) if is_cuda(device) else None


def rng_state(device: str) -> torch.Tensor | None:
    """The RNG state of this device, the one GPU this process draws from; None on a CPU (the
    CPU generator is saved with python's and numpy's)."""
    return torch.cuda.get_rng_state(cuda_index(device)) if is_cuda(device) else None


def set_rng_state(state: torch.Tensor | None, device: str) -> None:
    """Restore a GPU's RNG state saved by `rng_state` onto this process's own GPU (the stream
    belongs to the process, not to a GPU number: it follows the rank to whatever GPU it has)."""
    if state is not None and is_cuda(device):
        torch.cuda.set_rng_state(state, cuda_index(device))
