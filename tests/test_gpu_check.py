"""scripts/gpu_check.py, the one-call GPU acceptance, kept from rotting on the CPU: `--plan` runs
anywhere, and its build-and-measure code (part c) runs on a tiny shape with device=cpu."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from helpers import load_script, run_command

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    return load_script("gpu_check")


def test_plan_runs_on_a_cpu_machine_and_names_the_wheels():
    done = run_command([sys.executable, str(SCRIPT), "--plan"], timeout=60)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "pytest -m gpu" in out and "train.device=cuda" in out
    assert "pip download --no-deps -d .whl --only-binary=:all: --python-version 3.12" in out
    for name in ("bitsandbytes==", "hydra-core==", "omegaconf==", "datasets==", "antlr4"):
        assert name in out
    assert "--wheels .whl --skip shape --skip plan --out" in out and 'carry=[".whl"]' in out
    assert "--add-to gpu_check.part.json" in out
    assert "recipe=llama3-8b-alpaca model=tiny-llama" in out and "# exit 2" in out
    assert "vLLM's Transformers backend when vllm is importable" in out


def test_without_a_gpu_it_refuses_with_a_pointer_to_plan(gpu_check, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the refusal on a machine without CUDA")
    assert gpu_check.main(["--skip", "pytest", "--skip", "e2e"]) == 2
    assert "--plan" in capsys.readouterr().err


def test_the_measurement_runs_on_a_tiny_shape_on_the_cpu(gpu_check, tmp_path):
    """Part c's code on a 4-layer model, bf16 on the CPU: every variant steps, the record and the
    doc section are written as on the GPU."""
    record = gpu_check.measure_shape("tiny", "cpu", steps=1, seq_len=16, micro_batch=2)
    assert set(record["variants"]) == {"plain", "final-only", "mode"}
    for variant in record["variants"].values():
        assert variant["tokens_per_step"] == 32 and variant["tokens_per_s"] > 0
        assert all(loss > 0 for loss in variant["losses"])
        assert variant["peak_allocated_bytes"] > 0
    assert record["settings"]["precision"] == "bf16" and record["settings"]["target_tokens"] == 30
    assert record["within_limit"] is True

    full = {
        "machine": "cpu",
        "versions": gpu_check.versions(),
        "date": "today",
        "python": "3",
        "shape": record,
        # Rendering only: a part d whose refusal check did not end as it must.
        "fsdp": {
            "ok": False,
            "gpus": 2,
            "steps": [{}, {}],
            "optimizer_checks": [{"as_expected": True}, {"as_expected": False}],
        },
        "passed": False,
    }
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n<!-- other:start -->\nkept\n<!-- other:end -->\n")
    saved = tmp_path / "record.json"
    saved.write_text(json.dumps(full))
    assert gpu_check.main(["--from-json", str(saved), "--doc", str(doc)]) == 0
    text = doc.read_text()
    assert "kept" in text and "| mode |" in text and "MoDE / final-only: peak" in text
    assert "- d. FSDP2 under torchrun, then resumed by one process: **failed**" in text
    assert "paged 8-bit AdamW with FSDP: 1 of 2 commands ended as they must" in text
    assert "- not run in this record: a. pytest -m gpu; b. tiny recipe end to end; e. " in text


def train_commands(gpu_check, run: Path, gpus: int):
    """Every `mode train` command the check runs, as (words after `train`, under torchrun,
    expected exit code, text the output must hold)."""
    found = [
        (c, False, 0, "") for c in gpu_check.e2e_commands(run) + gpu_check.flagship_commands(run)
    ]
    found += [(c, "torch.distributed.run" in c, 0, "") for c in gpu_check.fsdp_commands(run, gpus)]
    found += [
        (c.command, "torch.distributed.run" in c.command, c.exit, c.says)
        for c in gpu_check.optimizer_checks(run, gpus)
    ]
    return [(c[c.index("train") + 1 :], *rest) for c, *rest in found if "train" in c]


@pytest.mark.parametrize("gpus", [1, 2])
def test_the_gpu_runs_decide_on_a_simulated_gpu_machine_as_the_check_expects(
    gpu_check, monkeypatch, tmp_path, gpus
):
    """Each `mode train` the check runs, validated and planned on a simulated machine of `gpus`
    GPUs: the ones it expects to train are valid, the refusal it expects says what it looks for,
    and the flagship's start line is the one it looks for."""
    from simulated_cuda import simulate_cuda

    from mode_cli.config import validate
    from mode_cli.errors import ModeError
    from mode_cli.recipes import compose_recipe
    from mode_cli.train.distributed import World
    from mode_cli.train.plan import plan_run

    simulate_cuda(monkeypatch, gpus)
    commands = train_commands(gpu_check, tmp_path / "run", gpus)
    assert len(commands) == 2 + 2 + 2 + 3
    for words, torchrun, code, says in commands:
        recipe = next(w.removeprefix("recipe=") for w in words if w.startswith("recipe="))
        cfg = compose_recipe(recipe, [w for w in words if not w.startswith("recipe=")])
        if torchrun:
            monkeypatch.setenv("TORCHELASTIC_RUN_ID", "check")
        else:
            monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
        if code == 2:
            with pytest.raises(ModeError) as refused:
                validate(cfg)
            assert says and says in " ".join(str(refused.value).split())
            continue
        assert code == 0
        validate(cfg)
        world = World(strategy=cfg.distributed.strategy, joined=torchrun)
        plan = plan_run(cfg, world)
        assert plan.device == "cuda:0"
        if recipe == "llama3-8b-alpaca":
            assert plan.summary() == gpu_check.FLAGSHIP_START


def test_the_engines_part_runs_on_the_cpu_and_skips_vllm_with_its_reason(
    gpu_check, tmp_path, model_cache
):
    """Part f on the CPU: a tiny ensemble export decodes mode's greedy tokens in plain transformers
    (another process); vLLM, not installed here, is skipped and the record says why."""
    record = gpu_check.run_engines(tmp_path, Path(model_cache), device="cpu")
    assert record["exit"] == 0, record["tail"]
    assert record["class"] == "MoDEForCausalLM"
    assert record["transformers_matches_mode"] and record["ok"]
    assert len(record["transformers"]) == len(gpu_check.ENGINE_PROMPTS)
    assert all(len(tokens) == gpu_check.ENGINE_TOKENS for tokens in record["transformers"])
    if "vllm" not in record:
        assert record["vllm_skipped"].startswith("vllm is not importable")
        assert "vLLM skipped: vllm is not importable" in gpu_check.engines_detail(record)


def test_the_plan_comparison_runs_on_a_tiny_shape_on_the_cpu(gpu_check, tmp_path):
    """Part g's code on the CPU: the plan of each (length, micro-batch) next to a measured step,
    errors computed, its table rendered (the figures mean something on CUDA only)."""
    part = gpu_check.measure_plan("tiny", "cpu", grid=((16, 2), (32, 1)), work=tmp_path)
    assert [(r["seq_len"], r["micro_batch"]) for r in part["rows"]] == [(16, 2), (32, 1)]
    for row in part["rows"]:
        assert row["planned_allocated_bytes"] < row["planned_reserved_bytes"]
        assert row["peak_allocated_bytes"] > 0 and row["plan"]["setup"]["micro_batch"] > 0
        assert (
            row["reserved_error"] == row["planned_reserved_bytes"] / row["peak_reserved_bytes"] - 1
        )
    assert part["goal"] == 0.10 and isinstance(part["within_goal"], bool)
    text = "\n".join(gpu_check.plan_markdown(part))
    assert "| 16 | 2 |" in text and "max_memory_reserved" in text
    assert "(1024, 2), (1024, 4), (2048, 2), (2048, 4)" in gpu_check.plan(
        gpu_check.argparse.Namespace(
            shape="llama3-8b", micro_batch=None, seq_len=None, steps=3, json="j", doc="d"
        )
    )
