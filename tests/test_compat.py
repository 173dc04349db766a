"""Run folders written by earlier releases keep working: `mode eval`, `mode generate`, `load` and
resuming from their checkpoints (tests/fixtures/README.md says how the fixture was made)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import records

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "run-0.1.0"


@pytest.fixture
def old_run(tmp_path) -> Path:
    run = tmp_path / "run-0.1.0"
    shutil.copytree(FIXTURE, run)
    return run


def test_the_fixture_is_an_old_run():
    saved = (FIXTURE / "config.yaml").read_text()
    assert "\nlora:" in saved and "\nadapter:" not in saved  # the key's name before 0.2


def test_an_old_run_evaluates(mode, old_run):
    code, _, err = mode("eval", f"checkpoint={old_run}", "examples=4", "eval.max_new_tokens=4")
    assert code == 0, err
    # The fixture's own report and the new one; the new one reads the same run.
    reports = sorted((old_run / "eval").glob("*/report.json"))
    assert len(reports) == 2
    new = json.loads(reports[-1].read_text())
    assert new["selected_layers"] == [2, 3, 4] and new["sides"] == ["base", "tuned"]


def test_an_old_run_and_its_merged_model_generate(mode, old_run):
    for folder in (old_run, old_run / "merged"):
        code, out, err = mode(
            "generate", f"checkpoint={folder}", "prompt=What is 2 + 2?", "max_new_tokens=4"
        )
        assert code == 0, err


def test_an_old_run_loads_from_python_with_the_ensemble(old_run):
    from mode_cli import load
    from mode_cli.models.modeling_mode import MoDEForCausalLM

    model, tokenizer = load(old_run)
    assert isinstance(model, MoDEForCausalLM) and model.model.ensemble
    assert model.mode_config.adapter.r == 8  # `lora` read as `adapter`
    ids = tokenizer("What is 2 + 2?", return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(model(**ids).logits).all()


def test_an_old_checkpoint_resumes_with_the_same_losses(mode, old_run, tmp_path):
    before = {r["step"]: r["loss"] for r in records(FIXTURE) if "loss" in r}
    out = tmp_path / "continued"
    checkpoint = old_run / "checkpoints" / "step-000002"
    code, _, err = mode(
        "train",
        "recipe=tiny-llama-alpaca",
        "train.max_steps=4",
        "checkpoint.every_steps=2",
        "train.lr_schedule=constant",
        f"resume={checkpoint}",
        f"output_dir={out}",
        "merge=false",
    )
    assert code == 0, err
    after = {r["step"]: r["loss"] for r in records(out) if "loss" in r}
    assert sorted(after) == [1, 2, 3, 4]  # steps 1-2 carried over from the old run's metrics
    for step in (3, 4):
        assert after[step] == pytest.approx(before[step], rel=1e-5)


def test_the_trainer_state_is_saved_and_restored_whole():
    from dataclasses import asdict, fields

    from mode_cli.train.checkpoint import TrainerState

    record = json.loads(
        (FIXTURE / "checkpoints" / "step-000002" / "trainer_state.json").read_text()
    )
    state = TrainerState.from_record(record)
    # Every counter an old checkpoint recorded is a field, and every field was recorded.
    assert {f.name for f in fields(TrainerState)} == set(record) - {"max_steps", "data"}
    assert {k: record[k] for k in asdict(state)} == asdict(state) and state.step == 2
