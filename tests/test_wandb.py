"""`logger=wandb`, offline (conftest sets WANDB_MODE=offline): the run files wandb writes are read
back record by record, and a missing wandb package is one clear message."""

from __future__ import annotations

import json
import struct
import sys
import time
from pathlib import Path

import pytest
from helpers import records, train_tiny

from mode_cli.train.sweep import plan_sweep

BLOCK = 32 * 1024  # the .wandb file is a LevelDB-style log: 32 KiB blocks of chunked records
HEADER = 7  # ":W&B", a 2-byte magic, a version byte; then each chunk: crc32, length, type


def wandb_records(path: Path) -> list:
    """Every record of an offline run's `run-<id>.wandb` file, as wandb's protobuf Records."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, pieces, found = HEADER, [], []
    while position + 7 <= len(data):
        left = BLOCK - position % BLOCK
        if left < 7:  # a block's tail too short for a chunk header is padding
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if length == 0 and kind == 0:
            position += left
            continue
        if position + 7 + length > len(data):
            break  # a chunk still being written
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        pieces = [chunk] if kind in (1, 2) else [*pieces, chunk]
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(pieces))
            found.append(record)
    return found


def finished_records(folder: Path, timeout: float = 60.0) -> tuple[Path, list]:
    """The records of the one offline run under `folder`, once its `exit` record is on disk:
    wandb's service may still be flushing the file when `finish()` has returned."""
    (path,) = folder.glob("wandb/offline-run-*/run-*.wandb")
    deadline = time.monotonic() + timeout
    while True:
        found = wandb_records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in found):
            return path, found
        assert time.monotonic() < deadline, f"{path} has no exit record after {timeout} s"
        time.sleep(0.2)


def read_run(folder: Path) -> dict:
    """The run's config, history rows by step, summary and group, from its records."""
    path, found = finished_records(folder)
    run: dict = {"history": {}, "summary": {}, "config": {}, "dir": path.parent}
    for record in found:
        kind = record.WhichOneof("record_type")
        if kind in ("run", "config"):
            config = record.run.config if kind == "run" else record.config
            for item in config.update:
                run["config"][item.key] = json.loads(item.value_json)
            if kind == "run":
                run["group"], run["name"] = record.run.run_group, record.run.display_name
        elif kind == "history":
            row = {
                "/".join(i.nested_key) or i.key: json.loads(i.value_json)
                for i in record.history.item
            }
            run["history"].setdefault(row["_step"], {}).update(row)
        elif kind == "summary":
            for item in record.summary.update:
                run["summary"]["/".join(item.nested_key) or item.key] = json.loads(item.value_json)
    return run


def test_an_offline_run_logs_config_steps_evals_and_the_report(mode, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-runs"))
    (tmp_path / "wandb-runs").mkdir()
    out = tmp_path / "run"
    train_tiny(
        mode, out, "logger=wandb", "wandb.group=unit", "train.max_steps=4", "eval.every_steps=2",
        "eval.max_examples=4", "eval.answer_examples=3", "eval.max_new_tokens=4",
    )  # fmt: skip
    run = read_run(tmp_path / "wandb-runs")
    assert run["group"] == "unit" and run["name"] == "run"
    assert (
        run["config"]["recipe"] == "tiny-llama-alpaca" and run["config"]["train"]["max_steps"] == 4
    )
    steps = [r for r in records(out) if "loss" in r]
    evals = [r for r in records(out) if "eval" in r]
    for record in steps:
        assert run["history"][record["step"]]["train/loss"] == pytest.approx(record["loss"])
    for record in evals:
        assert run["history"][record["step"]]["eval/final"] == pytest.approx(
            record["eval"]["final"]
        )
        assert "eval/ensemble" in run["history"][record["step"]]
    # The summary holds each key's last value: the last step's loss.
    assert run["summary"]["train/loss"] == pytest.approx(steps[-1]["loss"])
    report = json.loads(next(out.glob("eval/*/report.json")).read_text())
    assert run["summary"]["report/final_loss"] == pytest.approx(
        report["layers"][-1]["tuned"]["loss"]
    )
    assert run["summary"]["report/exact_match/tuned_ensemble"] == pytest.approx(
        report["answers"]["heads"]["ensemble"]["accuracy"]
    )
    media = run["dir"] / "files" / "media"
    (table,) = media.glob("table/report/layers_*.table.json")
    layers = json.loads(table.read_text())
    assert layers["columns"][0] == "layer" and len(layers["data"]) == 5  # 4 layers + ensemble
    assert len(list(media.glob("images/report/layers_png_*.png"))) == 1
    assert (out / "wandb-run-id").read_text().strip() in run["dir"].name


def test_without_wandb_installed_logger_wandb_is_one_clear_message(mode, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    out = tmp_path / "run"
    code, _, err = mode("train", "recipe=tiny-llama-alpaca", f"output_dir={out}", "logger=wandb")
    assert code == 2
    assert "logger=wandb needs the wandb package" in err and 'pip install "mode-cli[wandb]"' in err
    assert not out.exists()


def test_a_sweep_groups_its_wandb_runs(tmp_path):
    sweep = plan_sweep(
        [
            "recipe=tiny-llama-alpaca",
            "loss=mode,final-only",
            "logger=wandb",
            f"output_dir={tmp_path}",
        ],
        check_hardware=False,
    )
    assert [run.cfg.wandb.group for run in sweep.runs] == [str(tmp_path)] * 2
    mine = plan_sweep(
        [
            "recipe=tiny-llama-alpaca",
            "loss=mode,final-only",
            "wandb.group=mine",
            f"output_dir={tmp_path}",
        ],
        check_hardware=False,
    )
    assert {run.cfg.wandb.group for run in mine.runs} == {"mine"}
