"""The tokenized-data cache: entries under `data_cache_dir()`, each a folder named by its key.

A key is a digest of everything that changes an entry's contents (`entry_key`): the source's
content digest, the format and field mapping, and for tokens the tokenizer, the chat template,
`data.max_seq_len`, which rows were tokenized and the `mode` version. An entry is written into a
staging folder and renamed into place once complete (`write_entry`), so a process killed while
writing leaves no entry: only a staging folder, which is never read and is swept away later. An
entry whose files do not have the sizes its `meta.json` records is not used.

`mode cache` lists the entries and their size; `mode cache clear` removes them.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from mode_cli.files import cache_dir, staged_folder

# Bumped whenever the files of an entry change meaning: older entries are then never read.
FORMAT_VERSION = 1
META = "meta.json"
# A staging folder whose writer is gone is removed once it is this old (seconds): younger ones
# may belong to a writer on another machine sharing the cache.
STALE_AFTER_S = 3600.0


def mode_version() -> str:
    """The installed version of `mode` (package metadata: importing `mode_cli` here would make an
    import cycle)."""
    try:
        return importlib.metadata.version("mode-cli")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def data_cache_dir() -> Path:
    """`$MODE_DATA_CACHE`, else the `data` folder of `mode`'s cache (`files.cache_dir`)."""
    explicit = os.environ.get("MODE_DATA_CACHE")
    return Path(explicit).expanduser() if explicit else cache_dir() / "data"


def entry_key(kind: str, parts: dict) -> str:
    """The key of an entry of `kind` made from `parts` (JSON values)."""
    text = json.dumps(
        {"kind": kind, "format_version": FORMAT_VERSION, "mode": mode_version(), **parts},
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def entry_folder(kind: str, key: str) -> Path:
    return data_cache_dir() / f"{kind}-{key}"


def find_entry(kind: str, key: str) -> Path | None:
    """The complete, intact entry with this key, marked as just used; None when there is none."""
    folder = entry_folder(kind, key)
    meta = read_meta(folder)
    if meta is None:
        return None
    for name, size in meta["files"].items():
        file = folder / name
        if not file.is_file() or file.stat().st_size != size:
            return None
    with suppress(OSError):  # a read-only cache is still a cache
        os.utime(folder)  # last used, for `mode cache`
    return folder


def read_meta(folder: Path) -> dict | None:
    try:
        return json.loads((folder / META).read_text())
    except (OSError, ValueError):
        return None


def write_entry(kind: str, key: str, fill: Callable[[Path], dict], keep: bool) -> Path:
    """Fill a new entry: `fill(folder)` writes its files and returns what `meta.json` records of
    it, and `meta.json` is written last. With `keep`, the folder is renamed into the cache once
    complete and its path returned; without, it is a private temporary folder the caller reads
    and then removes (`data.cache=false`).
    """
    if not keep:
        folder = Path(tempfile.mkdtemp(prefix=f"mode-{kind}-"))
        try:
            write_meta(folder, kind, key, fill(folder))
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return folder
    target = entry_folder(kind, key)
    sweep_staging(target.parent)
    # A damaged entry under this key is replaced; an intact one another writer just finished
    # is kept.
    damaged = target.exists() and find_entry(kind, key) is None
    with staged_folder(target, replace=damaged) as staging:
        write_meta(staging, kind, key, fill(staging))
    return target


def write_meta(folder: Path, kind: str, key: str, meta: dict) -> None:
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
    record = {
        "kind": kind,
        "key": key,
        "mode": mode_version(),
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "files": files,
        **meta,
    }
    (folder / META).write_text(json.dumps(record, indent=1))


def staging_owner(folder: Path) -> int | None:
    """The process id in a staging folder's name (`.NAME.tmp-PID-HEX`), or None."""
    try:
        return int(folder.name.rsplit(".tmp-", 1)[1].split("-")[0])
    except (IndexError, ValueError):
        return None


def sweep_staging(root: Path) -> None:
    """Remove staging folders left by writers that died (killed mid-write) once they are old."""
    if not root.is_dir():
        return
    now = time.time()
    for folder in root.glob(".*.tmp-*"):
        pid = staging_owner(folder)
        try:
            old = now - folder.stat().st_mtime > STALE_AFTER_S
        except OSError:
            continue
        if pid is not None and old and not process_alive(pid):
            shutil.rmtree(folder, ignore_errors=True)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------------------- `mode cache`


@dataclass
class Entry:
    """An entry (or an unfinished staging folder) of the cache, for `mode cache`."""

    path: Path
    kind: str
    bytes: int
    last_used: float
    source: str = ""
    rows: int = 0
    tokens: int = 0
    complete: bool = True


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def list_entries() -> list[Entry]:
    """Every entry and staging folder of the cache, most recently used first."""
    root = data_cache_dir()
    if not root.is_dir():
        return []
    found = []
    for folder in root.iterdir():
        if not folder.is_dir():
            continue
        meta = read_meta(folder) if not folder.name.startswith(".") else None
        found.append(
            Entry(
                path=folder,
                kind=(meta or {}).get("kind", "unfinished"),
                bytes=folder_bytes(folder),
                last_used=folder.stat().st_mtime,
                source=(meta or {}).get("source", ""),
                rows=(meta or {}).get("rows", 0),
                tokens=(meta or {}).get("tokens", 0),
                complete=meta is not None,
            )
        )
    return sorted(found, key=lambda e: e.last_used, reverse=True)


def clear_entries() -> tuple[int, int]:
    """Remove every entry and staging folder; (folders removed, bytes freed). Staging folders of
    writers still running are left alone."""
    removed = freed = 0
    for entry in list_entries():
        pid = staging_owner(entry.path) if not entry.complete else None
        if pid is not None and process_alive(pid):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed += 1
        freed += entry.bytes
    return removed, freed
