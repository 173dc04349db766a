"""docs/benchmarks.md is written by several benchmark scripts: each owns one section, between
`<!-- NAME:start -->` and `<!-- NAME:end -->`, and rewrites only that one."""

from __future__ import annotations

from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
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
