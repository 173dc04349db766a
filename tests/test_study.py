"""The published study (docs/study.md, `make study`): the page is there and whole, and the verdict
it prints follows from the paired intervals."""

from __future__ import annotations

import importlib.util
import math
import re
import statistics
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("study", REPO / "scripts" / "study.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["study"] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules["study"]


def fake_runs(study, eval_loss: dict, exact: dict) -> dict:
    """Runs with these eval losses and exact-match rates per (method name, seed)."""
    runs = {}
    for method in study.METHODS:
        for seed in study.SEEDS:
            loss = eval_loss[method.name][seed]
            runs[(method.name, seed)] = {
                "train_loss": 0.1,
                "eval_final": loss,
                "eval_ensemble": loss - 0.01 if method.routed else None,
                "em": {"final": exact[method.name][seed]}
                | ({"ensemble": exact[method.name][seed]} if method.routed else {}),
            }
    return {"runs": runs}


def test_the_verdict_follows_the_paired_intervals(study):
    seeds = study.SEEDS
    baseline = [0.050, 0.060, 0.055]
    eval_loss = {m.name: dict(zip(seeds, baseline, strict=True)) for m in study.METHODS}
    # mode: its ensemble 0.01 lower on every seed (its final layer 0.005 lower): better.
    eval_loss["mode"] = {s: v - 0.005 for s, v in eval_loss["final-only"].items()}
    # mode-nodistill: higher on one seed, lower on two: no difference told apart.
    eval_loss["mode-nodistill"] = dict(zip(seeds, [0.060, 0.050, 0.050], strict=True))
    exact = {m.name: dict(zip(seeds, [0.5, 0.6, 0.7], strict=True)) for m in study.METHODS}
    exact["dora"] = dict(zip(seeds, [0.3, 0.41, 0.5], strict=True))  # ~0.2 lower each seed
    data = fake_runs(study, eval_loss, exact)

    diff = study.paired(data, study.METHODS[1], study.BASELINE, "eval_decode")
    assert diff["mean"] == pytest.approx(-0.015) and diff["excludes_zero"]
    diffs = [0.060 - 0.050, 0.050 - 0.060, 0.050 - 0.055]
    half = 4.302653 * statistics.stdev(diffs) / math.sqrt(3)
    got = study.paired(data, study.METHODS[2], study.BASELINE, "eval_decode")
    assert (got["low"], got["high"]) == pytest.approx(
        (statistics.mean(diffs) - 0.01 - half, statistics.mean(diffs) - 0.01 + half), abs=1e-6
    )  # its ensemble is 0.01 below its final layer

    lines = "\n".join(study.verdict(data))
    assert "**mode** against **final-only**: eval loss, decoding head better (-0.0150" in lines
    nodistill = next(
        line for line in study.verdict(data) if line.startswith("- **mode-nodistill**")
    )
    assert "exact match, decoding head (points) no difference told apart (+0.0" in nodistill
    dora = next(line for line in study.verdict(data) if line.startswith("- **dora** against"))
    assert "exact match, decoding head (points) worse (-19.7" in dora


def test_the_published_study_names_its_command_and_has_every_method_with_three_seeds(study):
    page = (REPO / "docs" / "study.md").read_text()
    assert "make study" in page and "scripts/study.py" in page
    assert re.search(r"\*\*Wall time: (\d+ h \d+ min|\d+ min)\*\* on 2 CPU cores", page)
    rows = {
        cells[1].strip("* "): cells[2].strip()
        for cells in (line.split("|") for line in page.splitlines() if line.startswith("| **"))
    }
    assert rows == {method.name: "3" for method in study.METHODS}
    for command in ("mode train -m recipe=smollm2-arithmetic", "mode eval checkpoint="):
        assert command in page
    for figure in ("curve.png", "layers.png", "seeds.png"):
        assert f"(study/{figure})" in page
        assert (REPO / "docs" / "study" / figure).read_bytes()[:4] == b"\x89PNG"
