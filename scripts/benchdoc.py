"""What the benchmark scripts share. docs/benchmarks.md is written by several of them: each owns
one section, between `<!-- NAME:start -->` and `<!-- NAME:end -->`, and rewrites only that one;
each names the machine (`cpu_model`) and measures its runs in processes of their own
(`run_worker`); the export scripts read the newest demo run (`newest_run`)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
TITLE = "# Benchmarks\n\nEach section is written by the script it names; rerun it to refresh it.\n"


def write_section(name: str, markdown: str, path: Path | str = DOC) -> None:
    """Replace section `name` of the document with `markdown` (appended when it is new)."""
    path = Path(path)
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{markdown.strip()}\n{end}\n"
    text = path.read_text() if path.is_file() else TITLE
    if start in text and end in text:
        before, rest = text.split(start, 1)
        after = rest.split(end, 1)[1].lstrip("\n")
        text = before + block + ("\n" + after if after else "")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)


def cpu_model() -> str:
    """The CPU's model name as the machine lines of the sections give it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def run_worker(script: str, args: list[str], what: str, env: dict | None = None) -> dict:
    """`script` run as a worker with `args` in a process and session of its own, offline; the
    JSON record it prints last. A failed worker stops the benchmark with its error output."""
    env = {**(env or os.environ), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    done = subprocess.run(
        [sys.executable, script, *args],
        capture_output=True,
        text=True,
        env=env,
        start_new_session=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"{what} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def newest_run(recipe: str = "smollm2-arithmetic") -> Path:
    """The newest run of `recipe` under outputs/ that has its merged folder (`make demo` writes
    one)."""
    runs = sorted(p for p in (ROOT / "outputs" / recipe).glob("*") if (p / "merged").is_dir())
    if not runs:
        raise SystemExit(f"no run of {recipe} with a merged folder in outputs/: run `make demo`")
    return runs[-1]
