"""scripts/gpu_check.py, the one-call GPU acceptance, kept from rotting on the CPU: `--plan` runs
anywhere, and its build-and-measure code (part c) runs on a tiny shape with device=cpu."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from helpers import run_command

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plan_runs_on_a_cpu_machine_and_names_the_wheels():
    done = run_command([sys.executable, str(SCRIPT), "--plan"], timeout=60)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "pytest -m gpu" in out and "train.device=cuda" in out
    assert "pip download --no-deps -d .whl --only-binary=:all: --python-version 3.12" in out
    for name in ("bitsandbytes==", "hydra-core==", "omegaconf==", "datasets==", "antlr4"):
        assert name in out
    assert "--wheels .whl --out" in out and 'carry=[".whl"]' in out


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
        "passed": True,
    }
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n<!-- other:start -->\nkept\n<!-- other:end -->\n")
    saved = tmp_path / "record.json"
    saved.write_text(json.dumps(full))
    assert gpu_check.main(["--from-json", str(saved), "--doc", str(doc)]) == 0
    text = doc.read_text()
    assert "kept" in text and "| mode |" in text and "MoDE / final-only: peak" in text


def test_the_plan_comparison_runs_on_a_tiny_shape_on_the_cpu(gpu_check, tmp_path):
    """Part e's code on the CPU: the plan of each (length, micro-batch) next to a measured step,
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
