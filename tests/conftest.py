"""Shared fixtures: offline (the hub and wandb), one thread, a session-wide model cache, the CLI
run in-process."""

from __future__ import annotations

import os

import pytest
import torch

# Nothing in the tests may reach the network, and tiny matmuls only lose from threading.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
# logger=wandb writes runs locally and quietly, and never reports errors to wandb's servers.
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ["WANDB_ERROR_REPORTING"] = "false"
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def library_messages():
    """The `mode_cli` logger's notes and warnings on stderr, as the command line shows them, in
    every test (not only after the first CLI call; pytest's own log capture would take them)."""
    from mode_cli.console import show_library_messages

    show_library_messages()


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory):
    """Tiny models are built once per session into this cache (the SmolLM2 conversion too,
    unless MODE_CACHE already points at a warm cache)."""
    if "MODE_CACHE" not in os.environ:
        os.environ["MODE_CACHE"] = str(tmp_path_factory.mktemp("mode-cache"))
    # Tokenized data stay with the session: a shared model cache must not fill up with them.
    os.environ["MODE_DATA_CACHE"] = str(tmp_path_factory.mktemp("data-cache"))
    return os.environ["MODE_CACHE"]


@pytest.fixture(scope="session")
def smollm2_conversion(model_cache):
    """SmolLM2-135M-Instruct converted from its GGUF once per session into the model cache:
    (cache, folder, log messages of the conversion)."""
    from pathlib import Path

    from mode_cli.models import smollm2

    cache = Path(model_cache)
    messages: list[str] = []
    folder = smollm2.ensure_converted(cache, log=messages.append)
    return cache, folder, messages


@pytest.fixture
def mode(capsys):
    """Run `mode ARGS...` in-process; returns (exit code, stdout, stderr)."""
    from mode_cli.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, model_cache):
    """One finished tiny-llama-alpaca run (5 steps), shared by the tests that read its outputs."""
    from mode_cli.cli import main

    out = tmp_path_factory.mktemp("runs") / "tiny"
    code = main(["train", "recipe=tiny-llama-alpaca", f"output_dir={out}", "train.max_steps=5"])
    assert code == 0
    return out
