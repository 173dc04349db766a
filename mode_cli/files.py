"""Files and folders: the files bundled with `mode`, its cache, writing folders so that an
interrupted write never leaves something that looks complete, and reading the files a user points
at (text, YAML, JSON, safetensors) so that a bad one is named in one message, never a traceback.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from mode_cli.errors import ModeError

BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"


def resolve_bundled(spec: str) -> Path:
    """`bundled:arithmetic/train.jsonl` -> the file shipped inside the package."""
    path = BUNDLED_DIR / spec.removeprefix("bundled:")
    if not path.exists():
        available = sorted(p.name for p in BUNDLED_DIR.iterdir()) if BUNDLED_DIR.is_dir() else []
        raise ModeError(f"No bundled resource '{spec}'. Bundled: {', '.join(available)}")
    return path


def cache_dir() -> Path:
    """Return the cache folder of `mode`.

    `$MODE_CACHE` if set, else `$XDG_CACHE_HOME/mode`, else `~/.cache/mode`. The folder is not
    created here.
    """
    explicit = os.environ.get("MODE_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "mode"
    return Path.home() / ".cache" / "mode"


def align_permissions(folder: Path) -> None:
    """Give every file the mode of a file written with the user's umask.

    safetensors writes its files 0600 while everything else follows the umask, which locks other
    users out of a shared cache or run folder.
    """
    probe = folder / f".umask-{secrets.token_hex(4)}"
    probe.touch()
    mode = probe.stat().st_mode & 0o777
    probe.unlink()
    for path in folder.rglob("*"):
        if path.is_file():
            path.chmod(mode)


@contextmanager
def staged_folder(target: Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `target`; when the block succeeds, rename it into place.

    Not tempfile.mkdtemp: its 0700 mode would survive the rename. With `replace=False`, losing a
    race to another writer of the same target is fine: the other copy is kept.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        yield staging
        align_permissions(staging)
        if replace and target.exists():
            shutil.rmtree(target)
        try:
            os.replace(staging, target)
        except OSError:
            if replace or not target.exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ---------------------------------------------------------------------------- reading a user's files


def open_file(path: Path) -> BinaryIO:
    """A file a user pointed at, opened for reading in binary; a folder, a missing or unreadable
    file is a ModeError naming it."""
    try:
        return path.open("rb")
    except IsADirectoryError:
        raise ModeError(f"{path} is a folder, not a file") from None
    except FileNotFoundError:
        raise ModeError(f"File not found: {path}") from None
    except OSError as err:
        raise ModeError(f"{path}: cannot be read ({err.strerror or err})") from None


def read_text(path: Path) -> str:
    """The text of a file a user pointed at, decoded as UTF-8 (a leading byte-order mark dropped).

    A folder, a missing or unreadable file, or bytes that are not UTF-8 are a ModeError naming the
    file (and, for the encoding, the line of the first bad byte).
    """
    with open_file(path) as handle:
        try:
            data = handle.read()
        except OSError as err:
            raise ModeError(f"{path}: cannot be read ({err.strerror or err})") from None
    try:
        # utf-8-sig: files saved by some editors start with a byte-order mark.
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        if data.startswith((b"\xff\xfe", b"\xfe\xff")):
            raise ModeError(
                f"{path}: not UTF-8 text (it starts with a UTF-16 byte-order mark); save it as "
                "UTF-8"
            ) from None
        line = data[: err.start].count(b"\n") + 1
        raise ModeError(
            f"{path}: not UTF-8 text (line {line}: byte 0x{data[err.start]:02x}); save it as UTF-8"
        ) from None


def yaml_problem(err: Exception) -> str:
    """Where a YAML parser stopped and why, on one line: `line L, column C: problem (context)`."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    context = getattr(err, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + problem + (f" ({context})" if context else "")


def read_yaml(path: Path):
    """A YAML file a user pointed at, as an OmegaConf container (an empty file: an empty mapping).

    Bad text or YAML that does not parse is a ModeError naming the file, with the line and column
    for a syntax error.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException
    from yaml import YAMLError

    text = read_text(path)
    try:
        return OmegaConf.create(text)
    except YAMLError as err:
        raise ModeError(f"{path}, {yaml_problem(err)}") from None
    except OmegaConfBaseException as err:
        raise ModeError(f"{path}: {str(err).splitlines()[0]}") from None


def read_json(path: Path) -> Any:
    """A JSON file a user pointed at (a run's `mode_head.json`, an adapter's config), parsed."""
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ModeError(
            f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})"
        ) from None
    except RecursionError:
        raise ModeError(f"{path}: not valid JSON (nested too deeply)") from None


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The tensors a safetensors file holds, by name, from its header alone (no data read).

    A missing file, or one whose header does not parse or whose size does not match its header
    (a truncated file), is a ModeError naming the file.
    """
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise ModeError(f"{path} is missing")
    try:
        with safe_open(str(path), framework="pt") as handle:
            names = handle.keys()
            return {name: tuple(handle.get_slice(name).get_shape()) for name in names}
    except (SafetensorError, OSError) as err:
        raise ModeError(f"{path} is damaged: {damage_reason(err)}") from None


def load_tensors(path: Path) -> dict:
    """The tensors of a safetensors file a user pointed at; a damaged file is a ModeError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    tensor_shapes(path)  # the header first: its message is the clearer one
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ModeError(f"{path} is damaged: {damage_reason(err)}") from None


def damage_reason(err: Exception) -> str:
    """safetensors' reason, in words ("Error while deserializing header: header too small")."""
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    if "deserializing header" in reason or "MetadataIncompleteBuffer" in reason:
        return f"truncated or not a safetensors file ({reason})"
    return reason


# ---------------------------------------------------------------------------- folders a run writes


def check_writable_folder(folder: Path, key: str, *, default_of: bool = False) -> None:
    """Refuse, before anything is written, a folder that `mode` could not create or write into:
    an existing file, a file on the way to it, or a place where no folder can be made (a
    read-only or virtual filesystem, no permission). `key` names the setting the folder comes
    from; `default_of`: the user left it unset, and `folder` is its default.

    Nothing is left behind: the check makes and removes an empty folder beside the target.
    """
    if default_of:
        where, hint = f"{folder}", f"; {key}=DIR writes there instead"
    else:
        where, hint = f"{key}={folder}", ""
    existing = folder
    try:
        if folder.exists() and not folder.is_dir():
            raise ModeError(f"{where}: {folder} is a file, not a folder{hint}")
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir():
            raise ModeError(f"{where}: {existing} is a file, not a folder{hint}")
        probe = existing / f".mode-probe-{os.getpid()}-{secrets.token_hex(4)}"
        probe.mkdir()
        probe.rmdir()
    except OSError as err:
        raise ModeError(
            f"{where}: cannot create a folder in {existing} ({err.strerror or err}){hint}"
        ) from None
