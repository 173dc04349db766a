"""Checkpoints and resume: exact continuation, refusals, interrupts and a process killed mid-write.

The signal and kill tests run the real `mode` CLI in a subprocess; the rest run it in-process.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import kill_group, records
from safetensors.torch import load_file

from mode_cli.train import checkpoint as checkpoint_mod

REPO = Path(__file__).resolve().parents[1]
# adapter.dropout > 0 makes every step draw from torch's RNG: exact resume needs its state back.
TINY = [
    "recipe=tiny-llama-alpaca",
    "adapter.dropout=0.1",
    "merge.enabled=false",
    "eval.compare_base=false",
    "eval.answers=off",
    "eval.max_examples=4",
]


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(run) if "loss" in r}


def checkpoints(run: Path) -> list[str]:
    return [p.name for p in checkpoint_mod.complete_checkpoints(run)]


def train(mode, out: Path, *overrides: str) -> tuple[int, str]:
    code, _, err = mode("train", *TINY, f"output_dir={out}", *overrides)
    return code, " ".join(err.split())  # rich wraps long lines at 80 columns off a terminal


def test_a_stopped_and_resumed_run_matches_an_uninterrupted_one(mode, tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    common = ["train.max_steps=6", "eval.every_steps=2", "checkpoint.every_steps=1"]
    code, err = train(mode, full, *common)
    assert code == 0, err

    code, err = train(mode, split, *common, "train.stop_after_steps=3", "logger=tensorboard")
    assert code == 0, err
    # The hint is this command with resume=auto, without the stop: it is what the next call runs.
    hint = " ".join(
        [
            "resume with: mode train recipe=tiny-llama-alpaca",
            *TINY[1:],
            *common,
            "logger=tensorboard",
        ]
        + [f"output_dir={split}", "resume=auto"]
    )
    assert hint in err
    assert checkpoints(split) == ["step-000002", "step-000003"]  # checkpoint.keep=2
    assert not (split / "adapter").exists()  # final outputs only once the run is complete
    assert sorted(losses(split)) == [1, 2, 3]

    code, err = train(mode, split, *common, "resume=auto", "logger=tensorboard")
    assert code == 0, err
    assert "resuming from" in err and "step-000003" in err
    a, b = losses(full), losses(split)
    assert sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        assert b[step] == pytest.approx(a[step], abs=1e-6), step
    eval_steps = [r["step"] for r in records(split) if "eval" in r]
    assert eval_steps == [2, 4, 6]
    assert (split / "adapter" / "adapter_model.safetensors").is_file()

    # The resumed TensorBoard events hold each step once, with the metrics' values.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(split / "tensorboard"))
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("train/loss")}
    assert sorted(logged) == [1, 2, 3, 4, 5, 6]
    for step, value in logged.items():
        assert value == pytest.approx(b[step], rel=1e-6)
    assert [e.step for e in events.Scalars("eval/ensemble")] == [2, 4, 6]


def test_a_damaged_newest_checkpoint_is_skipped_for_the_one_before(mode, tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    common = ["train.max_steps=5", "checkpoint.every_steps=1"]
    code, err = train(mode, full, *common)
    assert code == 0, err
    code, err = train(mode, split, *common, "train.stop_after_steps=3")
    assert code == 0, err
    assert checkpoints(split) == ["step-000002", "step-000003"]
    damaged = split / "checkpoints" / "step-000003" / "adapter.safetensors"
    with damaged.open("r+b") as handle:
        handle.truncate(damaged.stat().st_size // 2)

    code, err = train(mode, split, *common, "resume=auto")
    assert code == 0, err
    assert f"checkpoint {damaged.parent} is damaged, skipped: {damaged}" in err
    assert f"resuming from {split / 'checkpoints' / 'step-000002'} (step 2/5)" in err
    a, b = losses(full), losses(split)
    assert sorted(b) == [1, 2, 3, 4, 5]
    for step in range(1, 6):
        assert b[step] == pytest.approx(a[step], abs=1e-6), step
    # The damaged one went at the resume; the one resumed from stays beside the newest two.
    assert checkpoints(split) == ["step-000002", "step-000004", "step-000005"]


def test_pruning_keeps_the_checkpoint_resumed_from_and_drops_the_past_it_rewrites(mode, tmp_path):
    """Checkpoints 2 (intact) and 4 (damaged): resume=auto continues from 2. With keep=1, a
    stop at 3 wrote step-3 and pruning by step number alone left only the damaged 4."""
    out = tmp_path / "run"
    common = ["train.max_steps=6", "checkpoint.every_steps=2"]
    code, err = train(mode, out, *common, "train.stop_after_steps=4")
    assert code == 0, err
    assert checkpoints(out) == ["step-000002", "step-000004"]
    damaged = out / "checkpoints" / "step-000004" / "optimizer.pt"
    with damaged.open("r+b") as handle:
        handle.truncate(100)

    keep_one = [*common, "checkpoint.keep=1", "resume=auto"]
    code, err = train(mode, out, *keep_one, "train.stop_after_steps=1")
    assert code == 0, err
    assert f"resuming from {out / 'checkpoints' / 'step-000002'}" in err
    # Step 4 is the past this run rewrites (metrics.jsonl drops it too); 2 is the last state
    # known good, 3 the newest.
    assert checkpoints(out) == ["step-000002", "step-000003"]
    assert "dropped step-000004" in err
    assert sorted(losses(out)) == [1, 2, 3]

    code, err = train(mode, out, *keep_one)
    assert code == 0, err
    assert f"resuming from {out / 'checkpoints' / 'step-000003'}" in err and "damaged" not in err
    assert checkpoints(out) == ["step-000003", "step-000006"]
    assert sorted(losses(out)) == [1, 2, 3, 4, 5, 6]


def test_a_checkpoint_records_the_checksum_of_each_file(mode, tmp_path):
    import hashlib

    out = tmp_path / "run"
    code, err = train(mode, out, "train.max_steps=1")
    assert code == 0, err
    folder = out / "checkpoints" / "step-000001"
    manifest = json.loads((folder / "manifest.json").read_text())["files"]
    written = {p.name for p in folder.iterdir()} - {"manifest.json", "COMPLETE"}
    assert set(manifest) == written and "adapter.safetensors" in written
    for name, record in manifest.items():
        data = (folder / name).read_bytes()
        assert record == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_resuming_drops_a_metrics_line_cut_short_by_a_kill(tmp_path):
    from mode_cli.errors import ModeError
    from mode_cli.train.progress import truncate_after

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"ste')
    truncate_after(path, 2)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
    path.write_text('{"step": 1}\nnot a record\n{"step": 2}\n')
    with pytest.raises(ModeError, match="metrics.jsonl, line 2"):
        truncate_after(path, 2)
    assert path.read_text() == '{"step": 1}\nnot a record\n{"step": 2}\n'


def test_a_checkpoint_holds_safetensors_and_weights_only_state(mode, tmp_path):
    out = tmp_path / "run"
    code, err = train(mode, out, "train.max_steps=2", "checkpoint.every_steps=null")
    assert code == 0, err
    assert checkpoints(out) == ["step-000002"]
    folder = out / "checkpoints" / "step-000002"
    adapter = load_file(str(folder / "adapter.safetensors"))
    assert adapter and all("lora_" in name for name in adapter)
    assert set(load_file(str(folder / "mode_head.safetensors"))) == {
        "norms.2.weight",
        "norms.3.weight",
        "router.weight",
        "router.bias",
    }
    for name in ("optimizer.pt", "scheduler.pt", "rng.pt"):
        torch.load(folder / name, weights_only=True)
    state = json.loads((folder / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["max_steps"] == 2
    # 64 examples in micro-batches of 4: two steps used the first two of epoch 0's 16.
    assert (state["epoch"], state["index"]) == (0, 2)

    # A checkpoint continued in another folder: its history comes along; the run is complete, so
    # only the final outputs are written.
    fork = tmp_path / "fork"
    code, err = train(mode, fork, "train.max_steps=2", f"resume={folder}")
    assert code == 0, err
    assert sorted(losses(fork)) == [1, 2] and (fork / "adapter").is_dir()
    # A checkpoint folder copied elsewhere under a name of its own is one too, continued here in
    # a run folder of checkpoints.
    kept = tmp_path / "kept" / "final-state"
    shutil.copytree(folder, kept)
    code, err = train(mode, out, "train.max_steps=2", f"resume={kept}")
    assert code == 0, err
    assert checkpoints(out) == ["step-000002"]


def test_resume_refuses_another_recipe_and_a_run_without_checkpoint(mode, tmp_path):
    out = tmp_path / "run"
    code, err = train(mode, out, "train.max_steps=4", "train.stop_after_steps=2")
    assert code == 0, err
    before = (out / "metrics.jsonl").read_text()
    code, err = train(
        mode, out, "train.max_steps=4", "resume=auto", "layers=last2", "train.lr=1e-2"
    )
    assert code == 2
    assert "layers.k: 3 -> 2" in err and "train.lr: 0.001 -> 0.01" in err
    assert (out / "metrics.jsonl").read_text() == before  # nothing changed

    code, err = train(mode, out, "train.max_steps=4")
    assert code == 2 and "resume=auto" in err and "already holds a run" in err

    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.yaml").write_text("recipe: x\n")
    code, err = train(mode, bare, "train.max_steps=4", "resume=auto")
    assert code == 2 and "no complete checkpoint" in err

    code, err = train(mode, tmp_path / "x", "resume=" + str(tmp_path / "missing"))
    assert code == 2 and "not found" in err


def test_resume_auto_starts_fresh_and_max_minutes_stops_with_a_checkpoint(mode, tmp_path):
    out = tmp_path / "run"
    code, err = train(mode, out, "train.max_steps=3", "resume=auto", "train.max_minutes=1e-6")
    assert code == 0, err
    assert "starting a new one" in err and "train.max_minutes" in err
    assert checkpoints(out) == ["step-000001"] and sorted(losses(out)) == [1]
    code, err = train(mode, out, "train.max_steps=3", "resume=auto")
    assert code == 0, err
    assert sorted(losses(out)) == [1, 2, 3] and checkpoints(out)[-1] == "step-000003"


def test_sigterm_finishes_the_step_writes_a_checkpoint_and_exits_143(mode, tmp_path, monkeypatch):
    """A real SIGTERM to this process while step 2 runs."""
    from mode_cli.train import recipe as recipe_mod

    real = recipe_mod.accumulate_gradients
    calls = []

    def signalled(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(recipe_mod, "accumulate_gradients", signalled)
    previous = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "run"
    code, err = train(mode, out, "train.max_steps=5")
    assert code == 143
    assert "SIGTERM" in err and "resume=auto" in err
    assert checkpoints(out) == ["step-000002"] and sorted(losses(out)) == [1, 2]
    assert signal.getsignal(signal.SIGTERM) is previous  # the handler is put back


@pytest.fixture
def spawn():
    """Start a `mode` process in its own session; the test's end kills whatever of it is left."""
    started = []

    def start(args: list[str], log: Path) -> subprocess.Popen:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        process = subprocess.Popen(
            args,
            cwd=REPO,
            env=env,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        started.append(process)
        return process

    yield start
    for process in started:
        kill_group(process)


def wait_for(predicate, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert process.poll() is None, "the run ended before the test could signal it"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


# A real `mode train` process whose steps take at least 0.2 s, so that the test's signal lands
# mid-run however fast the machine is.
SLOW_STEPS = """
import sys, time
import mode_cli.train.recipe as recipe

real = recipe.accumulate_gradients

def slow(*args, **kwargs):
    time.sleep(0.2)
    return real(*args, **kwargs)

recipe.accumulate_gradients = slow
from mode_cli.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_ctrl_c_on_a_real_process_checkpoints_and_resume_completes(mode, tmp_path, spawn):
    out, log, script = tmp_path / "run", tmp_path / "log.txt", tmp_path / "slow.py"
    script.write_text(SLOW_STEPS)
    overrides = ["train.max_steps=12", "checkpoint.every_steps=null"]
    process = spawn(
        [sys.executable, str(script), "train", *TINY, f"output_dir={out}", *overrides], log
    )
    metrics = out / "metrics.jsonl"
    wait_for(lambda: metrics.is_file() and metrics.read_text().strip(), process)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == 130
    text = " ".join(log.read_text().split())
    assert "SIGINT" in text and f"output_dir={out} resume=auto" in text
    (stopped,) = checkpoints(out)
    step = int(stopped.split("-")[1])
    assert 1 <= step < 12 and sorted(losses(out)) == list(range(1, step + 1))

    code, err = train(mode, out, *overrides, "resume=auto")
    assert code == 0, err
    assert sorted(losses(out)) == list(range(1, 13))


KILLED_MID_WRITE = """
import sys, time
from pathlib import Path
import mode_cli.train.checkpoint as checkpoint

real_save_file, calls = checkpoint.save_file, []

def save_file(tensors, path):
    # Each checkpoint saves the adapter then the head: the 3rd call is the second checkpoint's
    # adapter. Write it for real, then stall mid-checkpoint until the test kills the process.
    real_save_file(tensors, path)
    calls.append(path)
    if len(calls) == 3:
        Path(sys.argv[1]).write_text(path)
        time.sleep(600)

checkpoint.save_file = save_file
from mode_cli.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_a_process_killed_while_writing_a_checkpoint_keeps_the_previous_one(mode, tmp_path, spawn):
    out = tmp_path / "run"
    script, paused = tmp_path / "stall.py", tmp_path / "paused.txt"
    script.write_text(KILLED_MID_WRITE)
    overrides = ["train.max_steps=6", "checkpoint.every_steps=2"]
    process = spawn(
        [sys.executable, str(script), str(paused), "train", *TINY, f"output_dir={out}", *overrides],
        tmp_path / "log.txt",
    )
    wait_for(paused.is_file, process)
    process.kill()  # SIGKILL: no handler, no cleanup
    process.wait(timeout=60)
    staging = Path(paused.read_text()).parent
    assert staging.is_dir() and staging.name.startswith(".step-000004.tmp-")
    assert checkpoints(out) == ["step-000002"]  # the half-written one is not taken for complete
    assert checkpoint_mod.latest_checkpoint(out).name == "step-000002"

    code, err = train(mode, out, *overrides, "resume=auto")
    assert code == 0, err
    assert "step-000002" in err
    assert sorted(losses(out)) == [1, 2, 3, 4, 5, 6]
    assert checkpoints(out) == ["step-000002", "step-000004", "step-000006"]
    assert not staging.exists()  # the leftover staging folder was cleaned up
