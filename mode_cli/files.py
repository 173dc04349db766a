"""Files and folders: the files bundled with `mode`, its cache, and writing folders so that an
interrupted write never leaves something that looks complete."""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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
