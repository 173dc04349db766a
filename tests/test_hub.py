"""Hub ids keep working: a model and a dataset resolved by id, with only the download faked.

The model test lays a tiny model out in a Hugging Face hub cache (as a download would) and runs
the real CLI in a subprocess with HF_HUB_OFFLINE=1 pointing at that cache.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import datasets
from helpers import run_command
from omegaconf import OmegaConf

from mode_cli import files as files_mod
from mode_cli.config import DataConfig, ModelConfig
from mode_cli.data.splits import load_splits
from mode_cli.models import loading as loading_mod

REVISION = "0123456789abcdef0123456789abcdef01234567"


def fake_download(cache: Path, repo_id: str, files: Path) -> None:
    """What `huggingface_hub` leaves in its cache after downloading a model repo."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    for file in files.iterdir():
        if file.is_file():
            shutil.copy(file, snapshot / file.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)


def test_a_hub_model_id_trains_and_merges(tmp_path):
    tiny = OmegaConf.merge(OmegaConf.structured(ModelConfig), {"name_or_path": "tiny:llama"})
    hub_cache = tmp_path / "hub"
    fake_download(hub_cache, "mode-test/tiny-llama", Path(loading_mod.resolve_source(tiny)))
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub_cache)}
    result = run_command(
        [
            sys.executable,
            "-m",
            "mode_cli",
            "train",
            "recipe=tiny-llama-alpaca",
            "model.name_or_path=mode-test/tiny-llama",
            f"output_dir={out}",
            "train.max_steps=2",
            "eval.max_examples=4",
        ],
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    config = (out / "config.yaml").read_text()
    assert "name_or_path: mode-test/tiny-llama" in config
    assert (out / "merged" / "model.safetensors").is_file()
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "mode-test/tiny-llama"


def test_a_hub_dataset_id_goes_through_datasets(monkeypatch):
    bundled = files_mod.resolve_bundled("bundled:arithmetic/eval.jsonl")
    calls = []
    real_load_dataset = datasets.load_dataset

    def fake_load_dataset(path, split=None, **kwargs):
        calls.append((path, split))
        return real_load_dataset("json", data_files=str(bundled), split="train")

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    cfg = OmegaConf.merge(
        OmegaConf.structured(DataConfig),
        {"train": "tatsu-lab/alpaca", "eval": None, "eval_fraction": 0.1, "max_seq_len": 256},
    )
    tokenizer = loading_mod.load_tokenizer(
        str(files_mod.resolve_bundled("bundled:tiny-tokenizer")),
        OmegaConf.structured(ModelConfig),
    )
    train, held_out = load_splits(cfg, tokenizer)
    assert calls == [("tatsu-lab/alpaca", "train")]
    assert len(train.examples) == 180 and len(held_out.examples) == 20
