"""Several processes on the CPU (gloo): the same training as one process with the global batch.

Forked ranks (fast: the parent has everything imported) check the losses and gradients of DDP and
of FSDP2 over 4-bit weights against one process, step by step; real torchrun jobs check the
command line end to end: per-step losses, a rank killed mid-run, Ctrl-C, and resuming.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
import torch
from helpers import kill_group, records, spawned
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
TINY = ["recipe=tiny-llama-alpaca", "merge=false", "eval.max_examples=4"]
# Forked ranks read 2 examples each of the single process's micro-batch of 4.
MICRO_PER_RANK = 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------------- forked ranks


def record_steps(recipe, steps: int) -> dict:
    """Run `steps` optimizer steps; per step the loss, every trainable gradient (whole tensors,
    gathered from the shards) as the optimizer received them, and the tokens seen so far."""
    losses, grads, tokens = [], [], []
    named = [(n, p) for n, p in recipe.module.named_parameters() if p.requires_grad]
    real_step = recipe.optimizer.step

    def step_and_record(*args, **kwargs):
        full = {}
        for name, p in named:
            grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            full[name] = grad.detach().clone()
        grads.append(full)
        return real_step(*args, **kwargs)

    recipe.optimizer.step = step_and_record
    recipe.model.train()
    recipe.started = time.perf_counter()
    trainable = [p for group in recipe.optimizer.param_groups for p in group["params"]]
    for step in range(1, steps + 1):
        record = recipe.train_step(step, trainable, boundary={})
        losses.append(record["loss"])
        tokens.append(recipe.state.seen_tokens)
    return {"losses": losses, "grads": grads, "tokens": tokens}


def tiny_recipe(out: Path, micro_batch: int, world=None, strategy: str = "ddp"):
    from mode_cli.recipes import compose_recipe
    from mode_cli.train.recipe import FinetuneRecipe

    cfg = compose_recipe(
        "tiny-llama-alpaca",
        [
            f"output_dir={out}",
            f"train.micro_batch_size={micro_batch}",
            f"distributed.strategy={strategy}",
            "train.max_steps=3",
            # Global micro-batches of 4, 4 and 1 example: at step 3 one of two ranks holds none.
            "data.max_train_examples=9",
        ],
    )
    recipe = FinetuneRecipe(cfg, world=world)
    recipe.setup_data()
    recipe.setup_model()
    recipe.start_new_run()
    return recipe


def join_forked(rank: int, world_size: int, port: int, strategy: str, timeout_s: float = 60):
    """This forked process as rank `rank` of a gloo job, with the environment torchrun gives."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        TORCHELASTIC_RUN_ID="forked",  # what torchrun gives its workers
    )
    from mode_cli.train.distributed import init_world

    return init_world(strategy, timeout_s=timeout_s, device="cpu")


def rank_main(
    rank: int, world_size: int, port: int, strategy: str, out: Path, state_first: bool = False
) -> None:
    """A forked rank: its own session (killed as a group by the parent on a timeout), then the
    same recipe as the single process, with micro-batch 2 per rank. `state_first`: before the
    first step, save and load the optimizer's state (`optimizer_state_before_any_update`)."""
    os.setsid()
    code = 1
    try:
        from mode_cli.train.distributed import close_world

        world = join_forked(rank, world_size, port, strategy)
        recipe = tiny_recipe(out, micro_batch=MICRO_PER_RANK, world=world, strategy=strategy)
        before = optimizer_state_before_any_update(recipe, world) if state_first else {}
        result = record_steps(recipe, steps=3)
        result.update(layout=layout(recipe), **before)
        if world.main:
            torch.save(result, out / "steps.pt")
        close_world(world)
        code = 0
    finally:
        os._exit(code)


def optimizer_state_before_any_update(recipe, world) -> dict:
    """Save and load the optimizer's state before the first update (a checkpoint after skipped
    steps, and its resume): what was saved, and how many parameters have state after each."""
    from mode_cli.train.distributed import load_optimizer_state, optimizer_state

    saved = optimizer_state(recipe.module, recipe.optimizer, world)
    states = {"after saving": len(recipe.optimizer.state)}
    # Every rank reads the checkpoint's file on a resume.
    load_optimizer_state(recipe.module, recipe.optimizer, world, world.broadcast(saved))
    states["after loading"] = len(recipe.optimizer.state)
    return {"saved": saved, "states": states}


def layout(recipe) -> dict:
    """How the wrapper holds the model: FSDP's units, or what DDP leaves unsynchronised."""
    from torch.distributed.fsdp import FSDPModule

    from mode_cli.models import families

    module = recipe.module
    named = dict(module.named_modules())
    lm_head = families.lm_head(recipe.model)
    return {
        "units": [name for name, m in named.items() if isinstance(m, FSDPModule)],
        "lm_head": next(name for name, m in named.items() if m is lm_head),
        "ignored": sorted(getattr(recipe.wrapped, "parameters_to_ignore", ())),
        "frozen": sorted(n for n, p in module.named_parameters() if not p.requires_grad),
    }


def run_forked(
    strategy: str, out: Path, world_size: int = 2, timeout: float = 120, state_first: bool = False
) -> dict:
    """`rank_main` run as `world_size` forked ranks; rank 0's result."""
    fork_ranks(rank_main, world_size, (strategy, out, state_first), timeout)
    return torch.load(out / "steps.pt")


def fork_ranks(target, world_size: int, args: tuple, timeout: float = 120) -> None:
    """Run `target(rank, world_size, port, *args)` in `world_size` forked processes, each in its
    own session; whatever is left at the timeout is killed by session, and every rank must end
    with exit 0."""
    context = multiprocessing.get_context("fork")
    port = free_port()
    ranks = [
        context.Process(target=target, args=(rank, world_size, port, *args))
        for rank in range(world_size)
    ]
    for process in ranks:
        process.start()
    deadline = time.monotonic() + timeout
    try:
        for process in ranks:
            process.join(max(0.1, deadline - time.monotonic()))
    finally:
        for process in ranks:
            if process.is_alive():
                os.killpg(process.pid, signal.SIGKILL)
                process.join()
    assert [process.exitcode for process in ranks] == [0] * world_size


@pytest.fixture(scope="module")
def single_process(tmp_path_factory, model_cache):
    """One process with the global micro-batch (4) of two ranks with 2 each."""
    out = tmp_path_factory.mktemp("single")
    return record_steps(tiny_recipe(out, micro_batch=4), steps=3)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_train_as_one_process_with_the_global_batch(strategy, single_process, tmp_path):
    ranks = run_forked(strategy, tmp_path)
    held = ranks["layout"]
    if strategy == "fsdp":
        # One unit per decoder layer and the root; the LM head is in the root unit (the chunked
        # loss reads its weight directly, which works only while the root is gathered).
        assert "" in held["units"] and len(held["units"]) == 1 + 4
        assert not any(held["lm_head"] == unit for unit in held["units"])
    else:
        # DDP synchronises only what trains: the frozen 4-bit base is each rank's own.
        assert held["frozen"] and set(held["frozen"]) <= set(held["ignored"])
    assert ranks["losses"] == pytest.approx(single_process["losses"], rel=1e-5)
    # The rank holding no example of step 3 runs a stand-in that trains nothing: no tokens.
    assert ranks["tokens"] == single_process["tokens"]
    for step, (mine, reference) in enumerate(
        zip(ranks["grads"], single_process["grads"], strict=True)
    ):
        assert mine.keys() == reference.keys() and len(mine) > 4
        assert any(name.startswith("head.") for name in mine)  # the MoDE head's too
        for name, grad in mine.items():
            torch.testing.assert_close(
                grad, reference[name], rtol=1e-5, atol=1e-7, msg=f"step {step + 1}: {name}"
            )


def test_an_fsdp_checkpoint_before_any_update_leaves_the_optimizer_as_it_was(
    single_process, tmp_path
):
    """torch's get_optimizer_state_dict gives a state-less optimizer its state by a fake step
    (AdamW at step 1 with zero moments: the next real update would be about 0.74x a single
    process's). Saved and loaded before the first update, the state stays empty and the run
    trains as one process does."""
    ranks = run_forked("fsdp", tmp_path, state_first=True)
    assert ranks["losses"] == pytest.approx(single_process["losses"], rel=1e-5)
    assert ranks["states"] == {"after saving": 0, "after loading": 0}
    # What one process saves then: no state, the parameters numbered in group order.
    saved = ranks["saved"]
    numbered = [i for group in saved["param_groups"] for i in group["params"]]
    assert saved["state"] == {} and numbered == list(range(len(numbered))) and len(numbered) > 4


# A run of 6 of 8 steps with checkpoints 2, 4 and 6, continued by forked ranks.
CONTINUED = [*TINY[1:], "train.max_steps=8", "checkpoint.every_steps=2", "checkpoint.keep=3"]


def resume_with_its_own_view(
    rank: int, world_size: int, port: int, strategy: str, out: Path, hidden_from: int
) -> None:
    """A forked rank that continues the run in `out` for one step (resume=auto). To the rank
    `hidden_from`, the newest checkpoint is not there, as on a machine of its own whose copy of
    output_dir lags. Writes what the rank resumed from, or the error it stopped with."""
    os.setsid()
    code = 1
    try:
        from mode_cli.errors import ModeError
        from mode_cli.recipes import compose_recipe
        from mode_cli.train import checkpoint as checkpoint_mod
        from mode_cli.train.distributed import close_world
        from mode_cli.train.recipe import FinetuneRecipe

        if rank == hidden_from:
            newest, real = checkpoint_mod.latest_checkpoint(out), checkpoint_mod.is_complete
            checkpoint_mod.is_complete = lambda path: Path(path) != newest and real(path)
        world = join_forked(rank, world_size, port, strategy, timeout_s=30)
        overrides = [*CONTINUED, "train.micro_batch_size=2", "train.stop_after_steps=1"]
        cfg = compose_recipe("tiny-llama-alpaca", [*overrides, f"output_dir={out}", "resume=auto"])
        recipe = FinetuneRecipe(cfg, world=world)
        try:
            recipe.run()
            result = {"resumed": recipe.resumed_step}
        except ModeError as err:
            result = {"error": " ".join(str(err).split())}
        torch.save(result, out.parent / f"rank-{rank}.pt")
        close_world(world)
        code = 0
    finally:
        os._exit(code)


@pytest.fixture(scope="module")
def six_of_eight_steps(tmp_path_factory, model_cache) -> Path:
    from mode_cli.cli import main

    out = tmp_path_factory.mktemp("continued") / "run"
    args = [*CONTINUED, "train.micro_batch_size=4", "train.stop_after_steps=6"]
    assert main(["train", "recipe=tiny-llama-alpaca", *args, f"output_dir={out}"]) == 0
    return out


@pytest.mark.parametrize("hidden_from", [0, 1])
def test_rank_0_chooses_the_checkpoint_and_every_rank_checks_it_has_it(
    six_of_eight_steps, tmp_path, hidden_from
):
    """On machines without one shared file system the ranks may see different checkpoints: rank
    0's choice is every rank's (ranks that chose for themselves trained on from different
    steps), and a rank without it stops the job with a message naming it."""
    out = tmp_path / "run"
    shutil.copytree(six_of_eight_steps, out)
    fork_ranks(resume_with_its_own_view, 2, ("ddp", out, hidden_from))
    results = [torch.load(tmp_path / f"rank-{rank}.pt") for rank in range(2)]
    if hidden_from == 0:  # rank 0 sees 2 and 4; rank 1 sees 6 too
        assert results == [{"resumed": 4}, {"resumed": 4}]
    else:  # rank 0 chooses 6, which rank 1 lacks
        newest = out / "checkpoints" / "step-000006"
        for result in results:
            assert f"rank 1: it has no complete checkpoint {newest}" in result.get("error", "")
        assert (out / "metrics.jsonl").read_text() == (
            six_of_eight_steps / "metrics.jsonl"
        ).read_text()


def test_the_forward_must_go_through_the_wrapper(single_process, tmp_path, monkeypatch):
    """What the test above catches: ranks that call the model directly never synchronise their
    gradients, and each one's differ from the one process's."""
    from mode_cli.train import recipe

    monkeypatch.setattr(recipe, "accumulate_gradients", _bypassing_the_wrapper(recipe))
    ranks = run_forked("ddp", tmp_path)
    reference = single_process["grads"][0]
    assert any(
        not torch.allclose(grad, reference[name], rtol=1e-3, atol=1e-6)
        for name, grad in ranks["grads"][0].items()
    )


def _bypassing_the_wrapper(recipe):
    real = recipe.accumulate_gradients

    def accumulate(module, *args, **kwargs):
        return real(getattr(module, "module", module), *args, **kwargs)

    return accumulate


def test_each_rank_reads_its_shard_of_the_global_batch():
    from mode_cli.data.tokenizing import IGNORE, Example
    from mode_cli.train.steps import BatchStream

    examples = [Example([i, 100], [i, 100]) for i in range(5)]
    whole = BatchStream(examples, 4, seed=0, pad_id=0)
    shards = [BatchStream(examples, 2, seed=0, pad_id=0, shard=(rank, 2)) for rank in range(2)]
    for _ in range(4):  # past the end of an epoch, whose last global batch holds one example
        expected = sorted(whole.next()["input_ids"][:, 0].tolist())
        seen = []
        for shard in shards:
            batch = shard.next()
            trained = (batch["labels"] != IGNORE).any(dim=1)
            seen += batch["input_ids"][trained, 0].tolist()
        assert sorted(seen) == expected
        assert [shard.position for shard in shards] == [whole.position] * 2


def test_a_step_is_normalised_by_the_target_tokens_of_every_rank():
    """Dividing by a rank's own count would weigh its tokens unlike the other rank's."""
    from mode_cli.train.distributed import World
    from mode_cli.train.steps import accumulate_gradients

    class OtherRankHasSix(World):
        """Rank 0 of 2, whose peer's micro-batch holds 6 target tokens."""

        def sum(self, values):
            return [values[0] + 6] if len(values) == 1 else values

    total = torch.tensor(0.0, requires_grad=True)

    def module(batch, weights, impl):
        class Sums:
            parts: dict = {}

        sums = Sums()
        sums.total = total * 1.0
        return sums

    batch = {"labels": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3)}
    result = accumulate_gradients(module, [batch], None, world=OtherRankHasSix(size=2))
    assert result.target_tokens == 2 + 6
    # d(loss)/d(sum) on this rank: world size / global tokens (DDP then averages the ranks).
    assert total.grad.item() == pytest.approx(2 / 8)


# ---------------------------------------------------------------------------- real jobs


@contextmanager
def job(command: list[str], log: Path, **kwargs) -> Iterator:
    """A launcher (torchrun, or `mode train distributed.nproc=N`) in its own session. Its workers
    run in sessions of their own (torch's agent starts them so): on leaving the block, they are
    killed by session too, then the launcher's group."""
    with spawned(
        command, env=environment(), stdout=log.open("w"), stderr=subprocess.STDOUT, **kwargs
    ) as launcher:
        try:
            yield launcher
        finally:
            for pid in children_of(launcher.pid):
                with suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
            kill_group(launcher)


def environment() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(run) if "loss" in r}


def logged_steps(run: Path) -> int:
    """Steps in a run's metrics.jsonl so far (a line being written is not counted)."""
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return sum(1 for line in lines if line.endswith("}"))


def test_torchrun_two_ranks_log_the_losses_of_one_process(mode, tmp_path):
    single, joint = tmp_path / "single", tmp_path / "job"
    # 9 examples: each epoch's last global micro-batch holds one, so rank 1 holds none at step 3.
    common = ["train.max_steps=5", "data.max_train_examples=9"]
    code, _, err = mode("train", *TINY, "train.micro_batch_size=4", *common, f"output_dir={single}")
    assert code == 0, err
    log = tmp_path / "log.txt"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "mode_cli",
        "train",
        *TINY,
        "train.micro_batch_size=2",
        *common,
        f"output_dir={joint}",
    ]
    with job(command, log, cwd=tmp_path) as launcher:
        assert launcher.wait(timeout=300) == 0, log.read_text()[-3000:]
    assert sorted(losses(joint)) == [1, 2, 3, 4, 5]
    for step, loss in losses(single).items():
        assert losses(joint)[step] == pytest.approx(loss, rel=1e-4)
    # Rank 0 alone wrote the run; its checkpoint has the single-process format.
    assert (joint / "adapter" / "adapter_config.json").is_file()
    assert (joint / "mode_head.json").is_file()
    state = json.loads((joint / "checkpoints" / "step-000005" / "trainer_state.json").read_text())
    assert state["global_micro_batch"] == 4 and state["processes"] == 2
    # The tokens behind tokens/s: the same as the one process's.
    alone = json.loads((single / "checkpoints" / "step-000005" / "trainer_state.json").read_text())
    assert state["seen_tokens"] == alone["seen_tokens"]
    text = log.read_text()
    assert text.count("mode train") == 1  # one rank speaks for the job


def children_of(pid: int) -> dict[int, dict[str, str]]:
    """The processes whose parent is `pid`, with their environments."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            if parent != pid:
                continue
            raw = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        env = dict(item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)
        found[int(entry.name)] = env
    return found


def wait_for(predicate, process, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert process.poll() is None, "the job ended before the test could act"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def launch_command(out: Path, *overrides: str) -> list[str]:
    return [
        str(Path(sys.executable).with_name("mode")),
        "train",
        *TINY,
        "distributed.nproc=2",
        "train.micro_batch_size=2",
        f"output_dir={out}",
        *overrides,
    ]


def test_a_killed_rank_ends_the_job_and_resume_completes_it(mode, tmp_path):
    out, log = tmp_path / "run", tmp_path / "log.txt"
    overrides = ["train.max_steps=60", "checkpoint.every_steps=2"]
    with job(launch_command(out, *overrides), log) as launcher:
        wait_for(lambda: logged_steps(out) >= 3, launcher)
        ranks = {env.get("RANK"): pid for pid, env in children_of(launcher.pid).items()}
        os.kill(ranks["1"], signal.SIGKILL)
        killed = time.monotonic()
        code = launcher.wait(timeout=60)
        assert time.monotonic() - killed < 60
    text = " ".join(log.read_text().split())
    assert code != 0 and "rank 1 failed first (killed by SIGKILL)" in text, text[-2000:]
    assert "resume=auto" in text
    # Any world that keeps the global micro-batch continues the run: here one process with 4.
    code, _, err = mode(
        "train", *TINY, "train.micro_batch_size=4", f"output_dir={out}", *overrides, "resume=auto"
    )
    assert code == 0, err
    assert sorted(losses(out)) == list(range(1, 61))


def test_ctrl_c_stops_every_rank_after_the_same_step(mode, tmp_path):
    out, log = tmp_path / "run", tmp_path / "log.txt"
    overrides = ["train.max_steps=60", "checkpoint.every_steps=null"]
    with job(launch_command(out, *overrides), log) as launcher:
        wait_for(lambda: logged_steps(out) >= 3, launcher)
        launcher.send_signal(signal.SIGINT)
        assert launcher.wait(timeout=120) == 130, log.read_text()[-3000:]
    (stopped,) = [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step-")]
    step = int(stopped.split("-")[1])
    assert sorted(losses(out)) == list(range(1, step + 1))
    assert "SIGINT" in log.read_text()
    code, _, err = mode(
        "train", *TINY, "train.micro_batch_size=4", f"output_dir={out}", *overrides, "resume=auto"
    )
    assert code == 0, err
    assert sorted(losses(out)) == list(range(1, 61))


def test_fsdp_over_4bit_weights_end_to_end_and_its_checkpoint_resumes_in_one_process(
    mode, tmp_path
):
    out, log = tmp_path / "fsdp", tmp_path / "log.txt"
    overrides = ["train.max_steps=4", "checkpoint.every_steps=2", "distributed.strategy=fsdp"]
    command = launch_command(out, *overrides, "merge=true", "eval.every_steps=2")
    with job(command, log) as launcher:
        assert launcher.wait(timeout=300) == 0, log.read_text()[-3000:]
    # Eval during training gathers the sharded model too.
    evals = [r["eval"] for r in records(out) if "eval" in r]
    assert len(evals) == 2 and all(e["ensemble"] > 0 for e in evals)
    # Gathered from the shards by rank 0: the adapter, the head, a report and the merged model.
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "mode_head.safetensors").is_file()
    (report,) = (out / "eval").glob("*/report.json")
    assert json.loads(report.read_text())["sides"] == ["base", "tuned"]
    assert (out / "merged" / "model.safetensors").is_file()
    # Its checkpoints are in the single-process format: one process continues from step 2.
    again = tmp_path / "again"
    code, _, err = mode(
        "train",
        *TINY,
        "train.micro_batch_size=4",
        "train.max_steps=4",
        f"resume={out / 'checkpoints' / 'step-000002'}",
        f"output_dir={again}",
    )
    assert code == 0, err
    for step in (3, 4):
        assert losses(again)[step] == pytest.approx(losses(out)[step], rel=1e-5)


def test_a_restarted_job_continues_from_its_last_checkpoint(mode, tmp_path):
    """distributed.max_restarts: torchrun reruns the command, which continues from the newest
    checkpoint. Started with resume=PATH alone, the job runs in that checkpoint's own run folder
    (as one process does), and the restart continues from the newest checkpoint, not PATH."""
    out, log = tmp_path / "run", tmp_path / "log.txt"
    overrides = ["train.max_steps=40", "checkpoint.every_steps=2"]
    code, _, err = mode(
        "train",
        *TINY,
        "train.micro_batch_size=4",
        *overrides,
        "train.stop_after_steps=2",
        f"output_dir={out}",
    )
    assert code == 0, err
    named = out / "checkpoints" / "step-000002"
    command = [
        str(Path(sys.executable).with_name("mode")),
        "train",
        *TINY,
        "distributed.nproc=2",
        "train.micro_batch_size=2",
        *overrides,
        "distributed.max_restarts=1",
        f"resume={named}",
    ]
    with job(command, log, cwd=tmp_path) as launcher:
        wait_for(lambda: logged_steps(out) >= 6, launcher)  # step-000004 is written
        ranks = {env.get("RANK"): pid for pid, env in children_of(launcher.pid).items()}
        os.kill(ranks["1"], signal.SIGKILL)
        assert launcher.wait(timeout=300) == 0, log.read_text()[-3000:]
    resumed = re.findall(r"resuming from (\S+) \(step", log.read_text())
    assert resumed[0] == str(named) and len(resumed) == 2, resumed
    restarted = Path(resumed[1])
    assert restarted.parent == named.parent and restarted.name > "step-000002", resumed
    assert sorted(losses(out)) == list(range(1, 41))
    assert not (tmp_path / "outputs").exists()  # no folder of its own


def test_the_launcher_runs_the_ranks_in_the_run_folder_they_continue(mode, tmp_path, monkeypatch):
    """What `distributed.nproc=N` asks torchrun to run: every rank and restart in one folder, the
    one a resume=PATH continues; a fresh job with restarts gets resume=auto."""
    from mode_cli.train import distributed

    started = []

    def launch(nproc, args, **kwargs):
        started.append(args)
        return distributed.LaunchResult(0)

    monkeypatch.setattr(distributed, "launch", launch)
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    named = run / "checkpoints" / "step-000002"
    named.mkdir(parents=True)
    (named / "trainer_state.json").write_text('{"step": 2}')
    (named / "COMPLETE").write_text("")
    job = [*TINY, "distributed.nproc=2", "distributed.max_restarts=1"]
    for resume in (named, run):
        code, _, err = mode("train", *job, f"resume={resume}")
        assert code == 0, err
        assert f"output_dir={run}" in started[-1] and f"resume={resume}" in started[-1]
        assert "resume=auto" not in started[-1]
    code, _, err = mode("train", *job, f"output_dir={tmp_path / 'new'}")
    assert code == 0, err
    assert started[-1][-2:] == [f"output_dir={tmp_path / 'new'}", "resume=auto"]
    # As for one process: resume=auto names no run folder, and a missing checkpoint is refused.
    code, _, err = mode("train", *job, "resume=auto")
    assert code == 2 and "resume=auto needs output_dir=DIR" in err
    code, _, err = mode("train", *job, f"resume={tmp_path / 'missing'}")
    assert code == 2 and "not found" in err
    assert len(started) == 3 and not (tmp_path / "outputs").exists()


def test_a_restarted_rank_resumes_the_newest_checkpoint_not_the_one_named(
    mode, tmp_path, monkeypatch
):
    """torchrun reruns a failed job's command as it was: resume=PATH names the checkpoint the job
    started from. A restart (TORCHELASTIC_RESTART_COUNT > 0) continues from the newest one."""
    from mode_cli.recipes import compose_recipe
    from mode_cli.train.recipe import FinetuneRecipe

    run = tmp_path / "run"
    overrides = ["train.max_steps=6", "checkpoint.every_steps=2"]
    code, _, err = mode("train", *TINY, *overrides, "train.stop_after_steps=4", f"output_dir={run}")
    assert code == 0, err
    named = run / "checkpoints" / "step-000002"
    cfg = compose_recipe("tiny-llama-alpaca", [*TINY[1:], *overrides, f"resume={named}"])
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    first = FinetuneRecipe(cfg)
    candidates, _ = first.find_checkpoint()
    assert candidates.paths == [named] and first.out == run
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    again = FinetuneRecipe(cfg)
    candidates, _ = again.find_checkpoint()
    assert candidates.paths[0] == run / "checkpoints" / "step-000004"
    assert again.out == run


def test_a_bad_distributed_recipe_is_refused_before_any_process_starts(mode, tmp_path):
    out = tmp_path / "run"
    code, _, err = mode(
        "train", *TINY, "distributed.nproc=2", "distributed.strategy=zero", f"output_dir={out}"
    )
    assert code == 2 and "distributed.strategy='zero': expected one of ddp, fsdp" in err
    # Answer accuracy decodes token by token, which the sharded model does not do at the end of
    # training: `on` (always) is refused rather than silently left out.
    code, _, err = mode(
        "train",
        *TINY,
        "distributed.nproc=2",
        "distributed.strategy=fsdp",
        "eval.answers=on",
        f"output_dir={out}",
    )
    printed = " ".join(err.split())
    assert code == 2 and "eval.answers=on with distributed.strategy=fsdp" in printed, printed
    assert "mode eval checkpoint=" in printed
    # `mode eval` of such a run scores them in one process: its recipe is not refused there.
    from mode_cli.config import validate
    from mode_cli.recipes import compose_recipe

    trained = compose_recipe(
        "tiny-llama-alpaca",
        ["distributed.nproc=2", "distributed.strategy=fsdp", "eval.answers=on"],
    )
    validate(trained, training=False)
    code, _, err = mode("train", "-m", *TINY, "loss=mode,final-only", "distributed.nproc=2")
    assert code == 2 and "a sweep runs one process per run" in err
    assert not out.exists()


def test_a_one_rank_fsdp_job_runs_the_sharded_code(single_process, tmp_path, monkeypatch):
    """torchrun with one process (one GPU) still wraps and shards: the same numbers as alone."""
    monkeypatch.setattr(sys.modules[__name__], "MICRO_PER_RANK", 4)
    ranks = run_forked("fsdp", tmp_path, world_size=1)
    assert len(ranks["layout"]["units"]) == 1 + 4
    assert ranks["losses"] == pytest.approx(single_process["losses"], rel=1e-5)


def test_world_size_without_rank_is_refused_with_what_is_missing(mode, tmp_path, monkeypatch):
    """Some clusters export WORLD_SIZE to every command: a plain `mode train` there is not a rank
    of a job, and guessing one would let several copies write the same run folder."""
    for name in ("RANK", "LOCAL_RANK", "TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = tmp_path / "run"
    code, _, err = mode("train", *TINY, f"output_dir={out}")
    printed = " ".join(err.split())
    assert code == 2, printed
    assert "WORLD_SIZE=2" in printed and "RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT" in printed
    assert "torchrun" in printed and "unset WORLD_SIZE" in printed
    assert not out.exists()


def test_a_job_one_rank_refused_exits_2(tmp_path, monkeypatch):
    """A rank that refuses the run (exit 2, its message printed) ends the job; the agent then stops
    the others, which exit 143 after their step, die by SIGTERM, or fail in a collective their
    peer left. The job's exit status is the refusal's, not theirs."""
    import torch.distributed.launcher.api as launcher_api
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from mode_cli.train.distributed import LaunchResult, launch

    def failure(rank: int, exitcode: int) -> ProcessFailure:
        return ProcessFailure(rank, 1000 + rank, exitcode, str(tmp_path / "no-error-file.json"))

    def job_ending_with(failures: dict):
        def elastic_launch(config, entrypoint):
            def run(*args):
                raise ChildFailedError("mode_cli", failures)

            return run

        monkeypatch.setattr(launcher_api, "elastic_launch", elastic_launch)
        return launch(2, ["train"])

    # Failures in the order the agent saw them: the refusing rank first.
    for stopped in (143, -signal.SIGTERM, 1):
        assert job_ending_with({1: failure(1, 2), 0: failure(0, stopped)}) == LaunchResult(2)
    # Every rank stopped as asked (Ctrl-C to the job) or refused alike: their own status.
    assert job_ending_with({0: failure(0, 130), 1: failure(1, 130)}) == LaunchResult(130)
    assert job_ending_with({0: failure(0, 2), 1: failure(1, 2)}) == LaunchResult(2)
    # A rank that died ends the job with 1 and says which.
    died = job_ending_with({1: failure(1, -signal.SIGKILL), 0: failure(0, 143)})
    assert died.exit_code == 1 and died.failure.startswith(
        "rank 1 failed first (killed by SIGKILL)"
    )


def test_a_job_starts_from_an_adapter_and_extends_its_run_as_one_process_does(mode, tmp_path):
    """init_from and train.extend under distributed.nproc=2 with FSDP: rank 0 checks the source
    and every rank loads it (the step-0 eval, before any training forward, and the losses are
    one process's), the adapter a mode-only run keeps frozen is saved whole from its shards, and
    the extension's schedule reaches every rank (the added steps warm up again, as alone)."""
    parent, single, joint = tmp_path / "parent", tmp_path / "single", tmp_path / "job"
    quick = ["eval.compare_base=false", "eval.answers=off", "loss=mode-only"]
    code, _, err = mode(
        "train", *TINY, *quick[:2], "loss=final-only", "train.max_steps=3", f"output_dir={parent}"
    )
    assert code == 0, err
    steps = {
        "start": [f"init_from={parent}", "train.max_steps=2"],
        "extend": ["resume=auto", "train.max_steps=4", "train.extend=restart"],
    }
    said = {}
    for name, overrides in steps.items():
        code, _, err = mode(
            "train", *TINY, *quick, "train.micro_batch_size=4", *overrides, f"output_dir={single}"
        )
        assert code == 0, err
        log = tmp_path / f"{name}.txt"
        command = launch_command(joint, *quick, "distributed.strategy=fsdp", *overrides)
        with job(command, log, cwd=tmp_path) as launcher:
            assert launcher.wait(timeout=300) == 0, log.read_text()[-3000:]
        said[name] = " ".join(log.read_text().split())
    assert f"start from the mode run {parent}" in said["start"]
    assert "extend: the run, finished at step 2, goes on to step 4" in said["extend"]
    start, alone = records(joint)[0]["eval"], records(single)[0]["eval"]
    for head in ("final", "ensemble"):
        assert start[head] == pytest.approx(alone[head], rel=1e-5), head
    assert sorted(losses(joint)) == [1, 2, 3, 4]
    for step, loss in losses(single).items():
        assert losses(joint)[step] == pytest.approx(loss, rel=1e-4), step
    lrs = {r["step"]: r["lr"] for r in records(joint) if "lr" in r}
    assert lrs == {r["step"]: r["lr"] for r in records(single) if "lr" in r}
    assert lrs[3] < lrs[4]  # warming up again
    kept = load_file(str(joint / "adapter" / "adapter_model.safetensors"))
    for name, tensor in load_file(str(parent / "adapter" / "adapter_model.safetensors")).items():
        assert torch.equal(kept[name], tensor), name
