"""What several test files share: a stand-in norm, a tiny training run, data and metrics helpers."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str):
    """`scripts/<name>.py` as a module, for tests of the repository's scripts."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class RMSNorm(nn.Module):
    """An RMSNorm with non-trivial weights, standing in for a model's final norm."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


# A run folder written by mode 0.1.0: adapter, head, checkpoints, report and merged folder.
OLD_RUN = Path(__file__).resolve().parent / "fixtures" / "run-0.1.0"


def old_run_copy(tmp_path: Path, part: str = "") -> Path:
    """A copy of `OLD_RUN` (or of its `part`, such as `merged`) to change, under `tmp_path`."""
    import shutil

    source = OLD_RUN / part if part else OLD_RUN
    return Path(shutil.copytree(source, tmp_path / (part or "run")))


def train_tiny(mode, out, *overrides: str, recipe: str = "tiny-llama-alpaca") -> None:
    """`mode train recipe=<tiny recipe> output_dir=OUT merge=false OVERRIDES...`, which must succeed."""
    code, _, err = mode("train", f"recipe={recipe}", f"output_dir={out}", "merge=false", *overrides)
    assert code == 0, err


def records(run: Path) -> list[dict]:
    """Every record of a run's metrics.jsonl."""
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def data_cfg(**values):
    """A `data` section of the schema with these values."""
    from mode_cli.config import DataConfig

    return OmegaConf.merge(OmegaConf.structured(DataConfig), values)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL a process started by `spawned` and everything it started, then reap it."""
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@contextmanager
def spawned(args: list[str], **kwargs) -> Iterator[subprocess.Popen]:
    """Start a process in a session of its own; on leaving the block, its whole process group is
    killed if anything of it is still running, so no orphan outlives the test."""
    process = subprocess.Popen(args, start_new_session=True, **kwargs)
    try:
        yield process
    finally:
        kill_group(process)


def run_command(args: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """`subprocess.run` with text output captured, in its own session: on timeout the whole
    process group is killed (not only the child) and TimeoutExpired is raised."""
    with spawned(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(process)
            raise
    return subprocess.CompletedProcess(args, process.returncode, stdout, stderr)


def naive_ensemble_logits(model, head, input_ids, attention_mask):
    """The MoDE ensemble by its definition: every selected layer's logits through its norm and the
    LM head, mixed with the router's weights, then the model's logit_fn (Gemma 2's soft-capping).
    No shortcut through the mixed state.

    A head with its own norm for layer N gets N's state before the model's final norm: the last
    decoder layer's output, kept here by a hook of this function's own."""
    from mode_cli.models import families

    layers = families.get_attr(model, families.family_of(model).layers)
    kept = []
    hook = layers[-1].register_forward_hook(lambda m, args, out: kept.append(out))
    states = list(families.hidden_states(model, input_ids, attention_mask))
    hook.remove()
    if head.train_final_norm:
        states[-1] = kept[0][0] if isinstance(kept[0], tuple) else kept[0]
    normed, weights = head(states)
    lm_head = families.lm_head(model)
    per_layer = torch.stack([lm_head(state) for state in normed])  # [|S|, B, T, V]
    mixed = torch.einsum("sbtv,bts->btv", per_layer, weights)
    logit_fn = families.logit_fn(model)
    return logit_fn(mixed) if logit_fn else mixed
