"""A simulated CUDA machine for CPU tests: torch answers every question a device decision asks (is
there a GPU, how many, which one is current, its name, memory, bf16 support, RNG state, peak
memory) as a machine with N GPUs would, while every tensor stays on the CPU.

Nothing that computes or allocates on a GPU is simulated: code that tries fails as on any CPU
machine ("Torch not compiled with CUDA enabled"), so what runs under it is the deciding code, and
what it decides is what it decides on a GPU machine.

    machine = simulate_cuda(monkeypatch, gpus=4)
"""

from __future__ import annotations

import struct
from types import SimpleNamespace

import torch

NAME = "NVIDIA GeForce RTX 4090"
MEMORY = 24 * 10**9


def seeded_state(seed: int, offset: int = 0) -> torch.Tensor:
    """A CUDA generator's state as torch gives it: 16 bytes, the seed then the Philox offset."""
    return torch.tensor(list(struct.pack("<qq", seed, offset)), dtype=torch.uint8)


class SimulatedCuda:
    """torch.cuda's answers for `gpus` GPUs of `memory` bytes each, with what was asked of it:
    `current` (set_device), `rng` (each GPU's generator state), `emptied` (the GPU current at
    each empty_cache call), `peak` (each GPU's peak allocated bytes, distinct per GPU)."""

    def __init__(self, gpus: int, *, name: str = NAME, memory: int = MEMORY, bf16: bool = True):
        self.gpus, self.name, self.memory, self.bf16 = gpus, name, memory, bf16
        self.current = 0
        self.rng = {i: seeded_state(0) for i in range(gpus)}
        self.peak = {i: (i + 1) * 2**30 for i in range(gpus)}
        self.emptied: list[int] = []

    def index(self, device=None) -> int:
        """The GPU a torch.cuda call means, as torch resolves it; IndexError past the last GPU
        (torch's `default_generators[idx]`)."""
        if device is None:
            return self.current
        if isinstance(device, int):
            idx = device
        else:
            place = torch.device(device)
            assert place.type == "cuda", f"a CUDA call with device {device!r}"
            idx = self.current if place.index is None else place.index
        if not 0 <= idx < self.gpus:
            raise IndexError("tuple index out of range")
        return idx

    # ------------------------------------------------------------------ what there is

    def is_available(self) -> bool:
        return self.gpus > 0

    def device_count(self) -> int:
        return self.gpus

    def current_device(self) -> int:
        return self.current

    def set_device(self, device) -> None:
        try:
            self.current = self.index(device)
        except IndexError:
            raise RuntimeError("CUDA error: invalid device ordinal") from None

    def get_device_properties(self, device=None):
        self.index(device)
        return SimpleNamespace(
            name=self.name, total_memory=self.memory, major=8, minor=9, multi_processor_count=128
        )

    def get_device_name(self, device=None) -> str:
        return self.get_device_properties(device).name

    def get_device_capability(self, device=None) -> tuple[int, int]:
        props = self.get_device_properties(device)
        return props.major, props.minor

    def is_bf16_supported(self, including_emulation: bool = True) -> bool:
        return self.bf16

    # ------------------------------------------------------------------ memory

    def memory_allocated(self, device=None) -> int:
        return self.peak[self.index(device)] // 2

    def max_memory_allocated(self, device=None) -> int:
        return self.peak[self.index(device)]

    def memory_reserved(self, device=None) -> int:
        return self.peak[self.index(device)]

    def max_memory_reserved(self, device=None) -> int:
        return self.peak[self.index(device)]

    def reset_peak_memory_stats(self, device=None) -> None:
        self.index(device)

    def mem_get_info(self, device=None) -> tuple[int, int]:
        return self.memory - self.memory_allocated(device), self.memory

    def empty_cache(self) -> None:
        self.emptied.append(self.current)

    def synchronize(self, device=None) -> None:
        self.index(device)

    # ------------------------------------------------------------------ random numbers

    def get_rng_state(self, device="cuda") -> torch.Tensor:
        return self.rng[self.index(device)].clone()

    def set_rng_state(self, new_state: torch.Tensor, device="cuda") -> None:
        self.rng[self.index(device)] = new_state.clone()

    def get_rng_state_all(self) -> list[torch.Tensor]:
        return [self.get_rng_state(i) for i in range(self.gpus)]

    def set_rng_state_all(self, new_states) -> None:
        for i, state in enumerate(new_states):
            self.set_rng_state(state, i)

    def manual_seed(self, seed: int) -> None:
        self.rng[self.current] = seeded_state(int(seed))

    def manual_seed_all(self, seed: int) -> None:
        for i in range(self.gpus):
            self.rng[i] = seeded_state(int(seed))


ANSWERS = [name for name in vars(SimulatedCuda) if not name.startswith("_") and name != "index"]


def simulate_cuda(monkeypatch, gpus: int, **machine) -> SimulatedCuda:
    """Make torch report a machine of `gpus` CUDA GPUs until the test ends (`monkeypatch` undoes
    it); a second call replaces the machine (a checkpoint written on 4 GPUs, resumed on 1)."""
    # Imported first, on the real answers: these read torch.cuda once, at import.
    import bitsandbytes  # noqa: F401

    from mode_cli.config import choices

    choices()
    simulated = SimulatedCuda(gpus, **machine)
    for name in ANSWERS:
        answer = getattr(simulated, name)
        monkeypatch.setattr(torch.cuda, name, answer)
        # torch.cuda's own helpers (get_rng_state_all, manual_seed...) call these by module.
        for module in (torch.cuda.random, torch.cuda.memory):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, answer)
    return simulated
