"""The published study (docs/study.md, `make study`): the page is there and whole, and the verdict
it prints follows from the paired intervals."""

from __future__ import annotations

import importlib.util
import json
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


# Five differences with sample standard deviation 1 and mean 0: shifted by t / sqrt(5) they have
# the t statistic t (4 degrees of freedom).
SPREAD = [k / math.sqrt(2.5) for k in (-2, -1, 0, 1, 2)]
# Two-sided p-values of t with 4 degrees of freedom (tables).
P_001, P_01, P_10 = 8.6103, 4.6041, 2.1318


def shifted(base: dict, t: float, scale: float) -> dict:
    """`base` plus differences whose paired t statistic is `t` (their sample std is `scale`)."""
    return {
        s: v + scale * (t / math.sqrt(5) + z)
        for (s, v), z in zip(base.items(), SPREAD, strict=True)
    }


def test_the_verdict_follows_the_paired_intervals(study):
    seeds = study.SEEDS
    assert len(seeds) == 5
    baseline = [0.050, 0.060, 0.055, 0.052, 0.058]
    eval_loss = {m.name: dict(zip(seeds, baseline, strict=True)) for m in study.METHODS}
    # mode: its ensemble 0.004 lower on every seed (its final layer 0.006 higher): better.
    eval_loss["mode"] = {s: v + 0.006 for s, v in eval_loss["final-only"].items()}
    # mode-nodistill: higher on two seeds, lower on three: no difference told apart.
    eval_loss["mode-nodistill"] = dict(zip(seeds, [0.070, 0.050, 0.060, 0.060, 0.070], strict=True))
    exact = {
        m.name: dict(zip(seeds, [0.5, 0.6, 0.7, 0.55, 0.65], strict=True)) for m in study.METHODS
    }
    exact["dora"] = dict(zip(seeds, [0.3, 0.41, 0.5, 0.35, 0.45], strict=True))  # ~0.2 lower each
    data = fake_runs(study, eval_loss, exact)

    diff = study.paired(data, study.METHODS[1], study.BASELINE, "eval_decode")
    assert diff["mean"] == pytest.approx(-0.004) and diff["excludes_zero"] and diff["p"] < 1e-6
    diffs = [
        a - 0.01 - b for a, b in zip([0.070, 0.050, 0.060, 0.060, 0.070], baseline, strict=True)
    ]
    half = 2.776445 * statistics.stdev(diffs) / math.sqrt(5)
    got = study.paired(data, study.METHODS[2], study.BASELINE, "eval_decode")
    assert (got["low"], got["high"]) == pytest.approx(
        (statistics.mean(diffs) - half, statistics.mean(diffs) + half), abs=1e-6
    )  # its ensemble is 0.01 below its final layer

    lines = "\n".join(study.verdict(data))
    assert "**mode** against **final-only**: eval loss, decoding head better (-0.0040" in lines
    nodistill = next(
        line for line in study.verdict(data) if line.startswith("- **mode-nodistill**")
    )
    assert "exact match, decoding head (points) no difference told apart (+0.0" in nodistill
    dora = next(line for line in study.verdict(data) if line.startswith("- **dora** against"))
    assert "exact match, decoding head (points) worse (-19.8" in dora


def test_the_headline_is_holm_corrected_over_the_measures_it_counts(study):
    """The bold line counts the 8 MoDE measures (each routed method against the method it adds
    to, eval loss and exact match of the decoding heads) and calls a measure only when its
    Holm-adjusted p-value is below 0.05; by hand: unadjusted p 0.001, 0.001, 0.01, 0.01, 0.10 and
    three of 1, sorted and multiplied by 8, 7, 6, ... give 0.008, 0.008 (0.007 carried up to the
    larger before it), 0.06, 0.06 (0.05 carried), 0.40, 1, 1, 1."""
    seeds = study.SEEDS
    base_loss = dict(zip(seeds, [0.050, 0.060, 0.055, 0.052, 0.058], strict=True))
    base_em = dict(zip(seeds, [0.50, 0.60, 0.70, 0.55, 0.65], strict=True))
    loss = dict.fromkeys([m.name for m in study.METHODS], base_loss)
    exact = dict.fromkeys([m.name for m in study.METHODS], base_em)
    # A routed run's ensemble is 0.01 below its final layer (fake_runs): add it back.
    ensemble = {s: v + 0.01 for s, v in base_loss.items()}
    loss["mode"] = shifted(ensemble, P_001, 0.002)  # worse, p 0.001
    exact["mode"] = shifted(base_em, P_001, 0.02)  # better, p 0.001
    loss["mode-nodistill"] = shifted(ensemble, -P_01, 0.002)  # better, p 0.01
    loss["dora + mode"] = shifted(ensemble, P_10, 0.002)  # worse, p 0.10
    exact["dora + mode"] = shifted(base_em, P_01, 0.02)  # better, p 0.01
    # dora decodes what dora + mode's ensemble does: differences of exactly 0 (p 1).
    loss["dora"] = {s: v - 0.01 for s, v in loss["dora + mode"].items()}
    exact["dora"] = exact["dora + mode"]
    data = fake_runs(study, loss, exact)

    measures = study.corrected(data)
    unadjusted = {m.name: round(m.diff["p"], 4) for m in measures}
    assert unadjusted == {
        "mode against final-only on eval loss": 0.001,
        "mode against final-only on exact match": 0.001,
        "mode-nodistill against final-only on eval loss": 0.01,
        "mode-nodistill against final-only on exact match": 1.0,
        "dora + mode against final-only on eval loss": 0.1,
        "dora + mode against final-only on exact match": 0.01,
        "dora + mode against dora on eval loss": 1.0,
        "dora + mode against dora on exact match": 1.0,
    }
    adjusted = {m.name: round(m.holm_p, 3) for m in measures}
    assert adjusted == {
        "mode against final-only on eval loss": 0.008,
        "mode against final-only on exact match": 0.008,
        "mode-nodistill against final-only on eval loss": 0.06,
        "mode-nodistill against final-only on exact match": 1.0,
        "dora + mode against final-only on eval loss": 0.4,
        "dora + mode against final-only on exact match": 0.06,
        "dora + mode against dora on eval loss": 1.0,
        "dora + mode against dora on exact match": 1.0,
    }
    # Both directions, by measure.
    assert study.summary(data) == (
        "Mixed, with a Holm correction over the 8 measures: MoDE was better on exact match (mode "
        "against final-only on exact match, adjusted p 0.008) and worse on eval loss (mode "
        "against final-only on eval loss, adjusted p 0.008); the other 6 were not told apart."
    )
    words = study.correction(data)
    assert "at least one in 34% of studies" in words  # 1 - 0.95^8
    assert "Before the correction, 4 of the 8 unadjusted 95% intervals excluded 0 (" in words
    assert "mode-nodistill against final-only on eval loss, p 0.010;" in words
    assert '"No difference told apart" means five seeds cannot separate' in words
    rows = study.correction_table(data)
    assert len(rows) == 2 + 8
    nodistill = next(r for r in rows if r.startswith("| mode-nodistill - final-only | eval"))
    assert nodistill.endswith("| 0.010 | 0.060 | no difference told apart |")

    # Only the worse one survives: the headline says MoDE did not help.
    exact["mode"] = base_em
    loss["mode-nodistill"] = ensemble
    exact["dora + mode"] = exact["dora"] = base_em
    worse = fake_runs(study, loss, exact)
    assert study.summary(worse) == (
        "MoDE did not help here, with a Holm correction over the 8 measures: worse on eval loss "
        "(mode against final-only on eval loss, adjusted p 0.008), better on none; the other 7 "
        "were not told apart."
    )
    # Only a better one: exact match better at p 0.001.
    loss["mode"] = ensemble
    exact["mode"] = shifted(base_em, P_001, 0.02)
    assert study.summary(fake_runs(study, loss, exact)) == (
        "MoDE helped here, with a Holm correction over the 8 measures: better on exact match "
        "(mode against final-only on exact match, adjusted p 0.008), worse on none; the other 7 "
        "were not told apart."
    )
    # An unadjusted p of 0.10 alone: 0.10 x 8 = 0.80.
    exact["mode"] = base_em
    assert study.summary(fake_runs(study, loss, exact)) == (
        "MoDE made no difference five seeds can tell apart: with a Holm correction over the 8 "
        "measures, none differs from its baseline (the smallest adjusted p-value is 0.80)."
    )
    assert "none of the 8 unadjusted 95% intervals excluded 0" in study.correction(
        fake_runs(study, loss, exact)
    )


def test_the_flatness_sentence_follows_the_curve_and_the_seed_scatter(study, monkeypatch):
    """The page says the baseline had not flattened when the longer run ends below the baseline
    runs by more than their seed standard deviation, and names one pass over the data."""
    monkeypatch.setattr(study, "STEPS", 500)
    monkeypatch.setattr(study, "CURVE_STEPS", 750)
    names = [m.name for m in study.METHODS]
    finals = dict(
        zip(study.SEEDS, [0.050, 0.052, 0.048, 0.052, 0.048], strict=True)
    )  # 0.0500 ± 0.0020
    data = fake_runs(study, dict.fromkeys(names, finals), dict.fromkeys(names, finals))

    def judged(**at: float) -> str:
        evals = {int(step[1:]): loss for step, loss in at.items()}
        data["curve"] = [{"step": s, "eval": {"final": v}} for s, v in evals.items()]
        data["curve"] += [{"step": 1, "loss": 1.0}]  # train records carry no eval
        return study.flatness(data)

    lower = judged(s500=0.045, s600=0.041, s750=0.040)
    assert "the 500-step baseline runs (5 seeds) end at 0.0500 ± 0.0020" in lower
    assert "lower the baseline's eval loss by 20.0% (5.0 seed standard deviations)" in lower
    assert "from step 600 to 750 its eval loss moved 2.4%" in lower  # (0.041 - 0.040) / 0.041
    assert "So the baseline had not flattened at the study's 500 steps" in lower
    assert "one pass over the train rows; past it the longer run reads them again" in lower
    assert "whether the gaps between methods change with a longer budget is not measured" in lower
    data["others"] = {200: {}}
    assert "the same gaps at 200 steps are in At other budgets below" in judged(s750=0.040)
    del data["others"]

    within = judged(s500=0.050, s600=0.045, s750=0.049)
    assert "within its seed scatter" in within and "had not flattened" not in within
    assert "itself flattens" not in within  # 600 -> 750 moved 8.9%
    higher = judged(s600=0.050, s750=0.055)
    assert "do not lower the baseline's eval loss (it ends 10.0% higher)." in higher
    monkeypatch.setattr(study, "STEPS", 200)
    assert "one pass" not in judged(s600=0.050, s750=0.055)
    assert "missing" in judged(s600=0.050)


def test_runs_kept_from_another_budget_stand_beside_this_ones(study, monkeypatch, tmp_path):
    """A rendering keeps its runs' numbers; a study at another budget reads them back and shows
    the same paired differences it would compute from the runs themselves."""
    seeds, names = study.SEEDS, [m.name for m in study.METHODS]
    loss = {
        name: dict(zip(seeds, [0.050, 0.060, 0.055, 0.050, 0.060], strict=True)) for name in names
    }
    loss["mode"] = {s: v + 0.004 for s, v in loss["final-only"].items()}  # ensemble: +0.004 - 0.01
    exact = {name: dict(zip(seeds, [0.5, 0.6, 0.7, 0.5, 0.6], strict=True)) for name in names}
    earlier = fake_runs(study, loss, exact)
    monkeypatch.setattr(study, "STEPS", 200)
    (tmp_path / "runs-200.json").write_text(json.dumps(study.kept_runs(earlier)))
    monkeypatch.setattr(study, "STEPS", 100)
    for seed in (1, 2, 3, 4):
        earlier["runs"][("dora", seed)] = None  # unfinished runs are not kept
    (tmp_path / "runs-100.json").write_text(json.dumps(study.kept_runs(earlier)))
    assert len(json.loads((tmp_path / "runs-100.json").read_text())["runs"]) == 21
    assert list(study.other_budgets(tmp_path)) == [200]  # its own budget is not another
    monkeypatch.setattr(study, "STEPS", 500)
    others = study.other_budgets(tmp_path)
    assert sorted(others) == [100, 200] and others[100]["runs"][("dora", 4)] is None
    whole = fake_runs(study, loss, exact)
    for method in study.METHODS[1:]:
        for key, *_ in study.COMPARED:
            kept = study.paired(others[200], method, study.BASELINE, key)
            assert kept == study.paired(whole, method, study.BASELINE, key)

    later = fake_runs(study, {n: {s: v / 2 for s, v in loss[n].items()} for n in names}, exact)
    rows = study.budgets_table(later | {"others": others})
    assert rows[0] == "| method or comparison | metric | 100 steps | 200 steps | 500 steps |"
    baseline = next(row for row in rows if "final-only | eval loss" in row)
    assert baseline.endswith("| 0.0550 ± 0.0050 | 0.0550 ± 0.0050 | 0.0275 ± 0.0025 |")
    mode = next(row for row in rows if row.startswith("| mode - final-only | eval loss"))
    # 200 steps: +0.004 - 0.01 on every seed; 500 steps: halved losses, the same 0.01 offset.
    assert mode.endswith("| -0.0060 [-0.0060, -0.0060] * | -0.0080 [-0.0080, -0.0080] * |")
    dora = next(row for row in rows if row.startswith("| dora - final-only | exact"))
    assert [cell.strip() for cell in dora.split("|")[3:6]] == [
        "-",  # one seed at 100 steps: nothing to pair
        "+0.0 [+0.0, +0.0]",
        "+0.0 [+0.0, +0.0]",
    ]


def test_the_pages_commands_say_each_setting_once(study, tmp_path):
    """The curve run overrides settings every run shares: its command says each key once, with the
    value it runs with."""
    curve = study.study_steps(tmp_path)["curve"].command()
    keys = [word.split("=", 1)[0] for word in curve if "=" in word]
    assert len(keys) == len(set(keys))
    assert f"train.max_steps={study.CURVE_STEPS}" in curve
    assert f"eval.max_examples={study.CURVE_EXAMPLES}" in curve


# Every step of the study, in the order it runs: the study's own, then what a user deploys.
STEPS = [
    "curve", "lora", "dora", "base", "demo-mode", "demo-final-only", "export-final",
    "lm-eval-final-only", "lm-eval-mode", "lm-eval-mode-final",
]  # fmt: skip


def faked_steps(study, calls: list, outcome: dict):
    """A stand-in for `run_step` that records each call and exits as `outcome` says; a demo run
    or the export that succeeds leaves the config.json of the folder it writes (the ensemble
    export's with an auto_map), as the harness commands read it."""

    def fake_step(name, command, log_dir, *, shown_as):
        calls.append((name, command))
        folder = {"demo-mode": "merged", "demo-final-only": "merged", "export-final": ""}
        if outcome[name] == 0 and name in folder:
            written = log_dir.parent / name / folder[name]
            written.mkdir(parents=True, exist_ok=True)
            auto_map = {"auto_map": {}} if name == "demo-mode" else {}
            (written / "config.json").write_text(json.dumps(auto_map))
        return {"command": study.shown(shown_as), "exit": outcome[name], "seconds": 10.0}

    return fake_step


def faked_study(study, monkeypatch, *, failing: str) -> tuple[list, dict]:
    """The study's steps faked (`failing` exits 1, the rest 0) and every run in one folder: the
    calls made, and the outcomes to change before a continued study."""
    calls: list = []
    outcome = dict.fromkeys(STEPS, 0) | {failing: 1}
    monkeypatch.setattr(study, "run_step", faked_steps(study, calls, outcome))
    monkeypatch.setattr(study, "run_dir", lambda out, method, seed: out / "lora" / "0-run")
    return calls, outcome


def test_the_study_ends_with_the_deployed_folders_scored_by_lm_eval(study, tmp_path, monkeypatch):
    """After the study's own steps: a `mode` and a `final-only` run at the demo's budget (the
    recipe as shipped, seed 0, merged/ on), the `mode` run's final-layer export, and lm_eval on
    the three folders, the ensemble export with trust_remote_code; each step waits for the one
    that writes its folder, and a stopped one starts again from nothing."""
    steps = study.study_steps(tmp_path)
    assert list(steps) == STEPS
    out = str(tmp_path)
    assert study.shown(steps["demo-mode"].command()) == (
        f"mode train recipe=smollm2-arithmetic loss=mode train.seed=0 train.threads=2 "
        f"output_dir={out}/demo-mode"
    )
    final_only = steps["demo-final-only"].command()
    assert "loss=final-only" in final_only and not any(
        w.startswith(("train.max_steps", "merge")) for w in final_only
    )  # the demo's own budget, merged/ written
    assert study.shown(steps["export-final"].command()) == (
        f"mode export checkpoint={out}/demo-mode head=final out={out}/export-final"
    )
    assert steps["export-final"].needs == ("demo-mode",)
    for name in ("demo-mode", "demo-final-only"):
        folder = tmp_path / name / "merged"
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(
            json.dumps({"auto_map": {}} if name == "demo-mode" else {})
        )
    (tmp_path / "export-final").mkdir()
    (tmp_path / "export-final" / "config.json").write_text("{}")
    tasks = "--tasks mode_arithmetic_mc,mode_arithmetic_gen --device cpu --batch_size 8"
    for name, folder, trust in (
        ("lm-eval-final-only", "demo-final-only/merged", ""),
        ("lm-eval-mode", "demo-mode/merged", ",trust_remote_code=True"),
        ("lm-eval-mode-final", "export-final", ""),
    ):
        command = steps[name].command()
        assert command[:3] == [sys.executable, "-m", "lm_eval"]
        assert study.shown(command) == (
            f"lm_eval --model hf --model_args pretrained={out}/{folder}{trust} --include_path "
            f"mode_cli/harness {tasks} --output_path {out}/{name}"
        )  # every item: no --limit
        assert not steps[name].resumes

    # A failed demo run: its export and scorings wait; a continued study runs them after it.
    calls, outcome = faked_study(study, monkeypatch, failing="demo-mode")
    study_out = tmp_path / "study"
    first = study.run_study(study_out)
    assert [name for name, _ in calls] == [
        n for n in STEPS if n not in ("export-final", "lm-eval-mode", "lm-eval-mode-final")
    ]
    assert "export-final" not in first["steps"]
    (study_out / "demo-mode" / "checkpoints").mkdir(parents=True)  # what the stop left
    calls.clear()
    outcome["demo-mode"] = 0
    second = study.run_study(study_out, continued=True)
    assert [name for name, _ in calls] == [
        "demo-mode", "export-final", "lm-eval-mode", "lm-eval-mode-final"
    ]  # fmt: skip
    assert calls[0][1][-1] != "resume=auto"  # the demo run starts again
    assert not (study_out / "demo-mode" / "checkpoints").exists()
    assert list(second["steps"])[6:] == [
        "lm-eval-final-only",
        "export-final",
        "lm-eval-mode",
        "lm-eval-mode-final",
    ]  # fmt: skip  (the record's order: the scoring of final-only ran first)
    assert list(study.in_order(second["steps"])) == STEPS  # the order the page lists them in
    assert "trust_remote_code=True" in second["steps"]["lm-eval-mode"]["command"]
    calls.clear()
    study.run_study(study_out, continued=True)
    assert calls == []  # everything finished: nothing runs again


def test_a_continued_study_keeps_finished_steps_and_resumes_the_rest(study, tmp_path, monkeypatch):
    """`--continue` after a stop: the steps that finished are not run again, a stopped sweep goes
    on with resume=auto (a run with no checkpoint yet starts again), and the time adds up."""
    calls, outcome = faked_study(study, monkeypatch, failing="dora")
    out = tmp_path / "study"
    first = study.run_study(out)
    assert [name for name, _ in calls] == STEPS
    assert first["steps"]["dora"]["exit"] == 1 and first["invocations"] == 1
    assert not any("resume=auto" in command for _, command in calls)

    # The dora sweep had one run with a checkpoint and one stopped before its first.
    resumable, partial = out / "dora" / "0-a", out / "dora" / "1-b"
    for run in (resumable, partial):
        (run / "checkpoints").mkdir(parents=True)
        (run / "config.yaml").write_text("{}\n")
    step = resumable / "checkpoints" / "step-000050"
    step.mkdir()
    (step / "COMPLETE").write_text("")
    (step / "trainer_state.json").write_text("{}")
    calls.clear()
    outcome["dora"] = 0
    second = study.run_study(out, continued=True)
    assert [name for name, _ in calls] == ["dora"]
    assert calls[0][1][-1] == "resume=auto"
    assert "resume=auto" not in second["steps"]["dora"]["command"]
    assert resumable.is_dir() and not partial.exists()
    assert second["steps"]["dora"] | {"seconds": 20.0} == second["steps"]["dora"]
    assert second["invocations"] == 2 and second["started"] == first["started"]
    assert json.loads((out / "study.json").read_text())["steps"]["dora"]["exit"] == 0


def test_a_stop_keeps_the_running_steps_time_and_the_page_says_what_no_step_holds(
    study, tmp_path, monkeypatch
):
    """The record keeps a running step's seconds on every save: a study killed mid-step (no
    step_done) and continued adds up that step's sittings, and the page names the wall time that
    no step's record holds."""
    now = [0.0]
    monkeypatch.setattr(study.time, "perf_counter", lambda: now[0])
    out = tmp_path / "study"
    out.mkdir()
    record = study.StudyRecord(out, continued=False)
    record.step_started("lora", "mode train -m ...")
    now[0] = 100.0
    record.save()  # the last save before a kill
    stopped = json.loads((out / "study.json").read_text())
    assert stopped["steps"]["lora"] == {
        "command": "mode train -m ...",
        "exit": None,
        "seconds": 100.0,
    }
    assert stopped["wall_s"] == 100.0
    assert "lora 2 min (not finished)." in study.parts(stopped)

    now[0] = 1000.0
    record = study.StudyRecord(out, continued=True)
    record.step_started("lora", "mode train -m ...")
    now[0] = 1250.0
    record.step_done("lora", {"command": "mode train -m ...", "exit": 0, "seconds": 250.0})
    done = json.loads((out / "study.json").read_text())
    assert done["steps"]["lora"]["seconds"] == 350.0 and done["steps"]["lora"]["exit"] == 0
    assert done["wall_s"] == 350.0
    assert study.parts(done) == "Its parts took: lora 6 min."

    # A record from a study stopped before its steps were timed: wall time no step holds.
    done["wall_s"] += 2 * 3600
    assert study.parts(done) == (
        "Its parts took: lora 6 min. 2 h 00 min of the wall time is in no part: sittings a stop "
        "cut short without their step's time being recorded."
    )


def test_time_the_study_stood_stopped_is_named_with_the_step_it_stopped(
    study, tmp_path, monkeypatch
):
    """A sample due every SAMPLE_S that comes more than SUSPENDED_S late means the study's
    processes stood stopped (SIGSTOP, a machine asleep): the record keeps it with the step it
    stopped and the page says so; a sample merely a little late is not a stop."""
    now = [0.0]
    monkeypatch.setattr(study.time, "perf_counter", lambda: now[0])
    out = tmp_path / "study"
    out.mkdir()
    record = study.StudyRecord(out, continued=False)
    record.late(study.SUSPENDED_S)  # a busy machine, not a stop
    record.late(90.0)  # between the steps
    record.step_started("dora", "mode train -m ...")
    record.late(676.0)
    now[0] = 3600.0
    record.step_done("dora", {"command": "mode train -m ...", "exit": 0, "seconds": 3600.0})
    saved = json.loads((out / "study.json").read_text())
    assert [(p["step"], p["seconds"]) for p in saved["suspended"]] == [
        (None, 90.0),
        ("dora", 676.0),
    ]
    assert study.parts(saved) == (
        "Its parts took: dora 1 h 00 min. The study stood stopped (its processes suspended, no "
        "run working) for 2 min between the steps and 11 min during dora; the times above "
        "include it."
    )
    # A step of seconds is not "0 min".
    assert study.duration(8.0) == "under 1 min" and study.duration(31.0) == "1 min"
    # A continued study keeps the stops its earlier sittings recorded.
    again = study.StudyRecord(out, continued=True)
    assert again.data["suspended"] == saved["suspended"]


def test_the_router_table_gives_each_selected_layers_weight_and_loss_over_seeds(study):
    """Per routed method and selected layer: the router's mean weight and the layer's eval loss,
    mean ± std over the seeds, from the runs' reports; a method with no finished run is a row of
    dashes, and a method without a router has no row."""

    def report(weights, losses):
        return {
            "num_layers": 30,
            "selected_layers": [28, 29, 30],
            "layers": [{"layer": 27, "selected": False, "tuned": {"loss": 2.0}, "router_weight": None}]
            + [
                {"layer": layer, "selected": True, "tuned": {"loss": loss},
                 "router_weight": {"mean": weight, "std": 0.01}}
                for layer, weight, loss in zip((28, 29, 30), weights, losses, strict=True)
            ]
        }  # fmt: skip

    runs = {(m.name, s): None for m in study.METHODS for s in study.SEEDS}
    # A run without a router reads every layer through the final norm: none is selected.
    plain = report((0.0, 0.0, 0.0), (1.0, 1.0, 0.03))
    runs[("final-only", 0)] = {
        "report": plain
        | {"selected_layers": [], "layers": [e | {"selected": False} for e in plain["layers"]]}
    }
    runs[("mode", 0)] = {"report": report((0.2, 0.3, 0.5), (0.06, 0.05, 0.2))}
    runs[("mode", 1)] = {"report": report((0.4, 0.1, 0.5), (0.08, 0.07, 0.04))}
    runs[("mode-nodistill", 2)] = {"report": report((0.05, 0.02, 0.93), (1.3, 0.95, 0.032))}
    lines = study.router_table({"runs": runs})
    assert lines[0] == (
        "| method | router weight, layer 28 | router weight, layer 29 | router weight, layer 30 "
        "(final) | eval loss, layer 28 | eval loss, layer 29 | eval loss, layer 30 (final) |"
    )
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in lines[2:]
    }
    assert set(rows) == {m.name for m in study.METHODS if m.routed}
    std = statistics.stdev
    assert rows["mode"] == [
        f"0.30 ± {std([0.2, 0.4]):.2f}", f"0.20 ± {std([0.3, 0.1]):.2f}", "0.50 ± 0.00",
        f"0.0700 ± {std([0.06, 0.08]):.4f}", f"0.0600 ± {std([0.05, 0.07]):.4f}",
        f"0.1200 ± {std([0.2, 0.04]):.4f}",
    ]  # fmt: skip
    assert rows["mode-nodistill"] == ["0.05", "0.02", "0.93", "1.3000", "0.9500", "0.0320"]
    assert rows["dora + mode"] == ["-"] * 6


def test_the_published_study_names_its_command_and_has_every_method_with_five_seeds(study):
    page = (REPO / "docs" / "study.md").read_text()
    assert "make study" in page and "scripts/study.py" in page
    assert re.search(r"\*\*Wall time: (\d+ h \d+ min|\d+ min)\*\* on 2 CPU cores", page)
    rows = {
        cells[1].strip("* "): cells[2].strip()
        for cells in (line.split("|") for line in page.splitlines() if line.startswith("| **"))
    }
    assert len(study.SEEDS) == 5
    assert rows == {method.name: "5" for method in study.METHODS}
    for command in ("mode train -m recipe=smollm2-arithmetic", "mode eval checkpoint="):
        assert command in page
    assert "| method | router weight, layer 28 | router weight, layer 29 |" in page
    # The runs' kept numbers are this page's: the baseline's row reads the same.
    kept = json.loads((REPO / "docs" / "study" / f"runs-{study.STEPS}.json").read_text())
    assert kept["steps"] == study.STEPS and len(kept["runs"]) == 5 * len(study.METHODS)
    eval_final = study.spread(study.values(study.kept_data(kept), study.BASELINE, "eval_final"), 4)
    baseline = next(line for line in page.splitlines() if line.startswith("| **final-only**"))
    assert f"| {eval_final} |" in baseline
    for figure in ("curve.png", "layers.png", "seeds.png"):
        assert f"(study/{figure})" in page
        assert (REPO / "docs" / "study" / figure).read_bytes()[:4] == b"\x89PNG"
    # The headline is the Holm-corrected verdict; the deployed folders' lm-eval rows are scored.
    verdict = page.split("## Verdict", 1)[1].split("\n## ", 1)[0]
    headline = next(line for line in verdict.splitlines() if line.startswith("**"))
    assert "Holm" in headline
    deployed = page.split("## Where users run it", 1)[1]
    for folder in study.DEPLOYED:
        row = next(line for line in deployed.splitlines() if line.startswith(f"| {folder.label} |"))
        assert " - |" not in row and row.count("% [") == len(study.HARNESS_SCORES)
    assert kept["deployed"]["scores"] == {
        folder.step: kept["deployed"]["scores"][folder.step] for folder in study.DEPLOYED
    }
    assert "These runs, the export and the scorings took" in deployed


def deployed(study, counts: dict) -> dict:
    """lm-evaluation-harness scores of the three deployed folders: (MC right, gen right) of 200
    each, by scoring step."""
    return {
        "scores": {
            step: {
                "mode_arithmetic_mc": {"correct": mc, "n": 200},
                "mode_arithmetic_gen": {"correct": gen, "n": 200},
            }
            for step, (mc, gen) in counts.items()
        },
        "steps": {"demo-mode": 36, "demo-final-only": 36},
    }


def test_the_deployed_folders_rows_and_which_to_deploy_follow_their_intervals(study):
    """The rows give each folder's rate with its 95% Wilson interval, and the sentence names the
    folder to deploy from where the intervals lie. Wilson by hand, z = 1.959964:
    (k + z^2 / 2) / (n + z^2) ± z sqrt(n) / (n + z^2) sqrt(p (1 - p) + z^2 / (4 n)), so over 200:
    40 [15.05, 26.09], 45 [17.26, 28.77], 48 [18.61, 30.37], 57 [22.70, 35.12],
    64 [25.93, 38.75], 65 [26.39, 39.27], 66 [26.86, 39.78], 80 [33.46, 46.92],
    90 [38.26, 51.92], 100 [43.14, 56.86], 120 [53.08, 66.54] (percent)."""
    final_only, ensemble, final = (d.step for d in study.DEPLOYED)

    def scored(mc_gen: tuple, *more: tuple) -> dict:
        return {
            "deployed": deployed(
                study, dict(zip((final_only, ensemble, final), (mc_gen, *more), strict=True))
            )
        }

    # Every interval overlaps: the plain final-layer export serves as well as the ensemble.
    data = scored((65, 45), (57, 48), (65, 45))
    assert study.deployed_table(data)[2:] == [
        "| `final-only` merged/ | `outputs/study/demo-final-only/merged` | plain transformers "
        "| 32.5% [26.4, 39.3] | 22.5% [17.3, 28.8] |",
        "| `mode` merged/ (ensemble) | `outputs/study/demo-mode/merged` | "
        "`trust_remote_code=True` | 28.5% [22.7, 35.1] | 24.0% [18.6, 30.4] |",
        "| `mode` head=final | `outputs/study/export-final` | plain transformers "
        "| 32.5% [26.4, 39.3] | 22.5% [17.3, 28.8] |",
    ]
    assert study.deployment(data) == (
        "Per these figures, the `mode` run's `head=final` export, a plain model, serves as well "
        "as its `merged/` ensemble, which needs `trust_remote_code`: the ensemble export's 95% "
        "interval overlaps that of the final-layer export on both tasks; against the "
        "`final-only` run's `merged/`, the final-layer export's interval overlaps on both tasks, "
        "so these figures do not prefer either run's folder."
    )
    # The ensemble above its final layer on gen (53.08 > 46.92), within final-only's (56.86).
    assert study.deployment(scored((65, 100), (64, 120), (66, 80))) == (
        "Per these figures, deploy the `mode` run's `merged/`, the ensemble export "
        "(`trust_remote_code`): the ensemble export's 95% interval lies above that of the "
        "final-layer export on gen exact match; against the `final-only` run's `merged/`, the "
        "ensemble export's interval overlaps on both tasks, so these figures do not prefer "
        "either run's folder."
    )
    # Both mode exports overlap (46.92 > 38.26); final-only lies above the final layer's
    # (53.08 > 51.92).
    assert study.deployment(scored((65, 120), (65, 80), (65, 90))).endswith(
        "against the `final-only` run's `merged/`, the final-layer export's interval lies below "
        "on gen exact match, so the `final-only` run's `merged/` is the better folder to deploy."
    )
    # The ensemble above its final layer on MC (53.08 > 46.92), below on gen (26.09 < 33.46),
    # and below final-only's on gen (26.09 < 43.14); the final layer within final-only's.
    assert study.deployment(scored((100, 100), (120, 40), (80, 80))) == (
        "Per these figures, the `mode` run's two exports split by task: the ensemble export's "
        "95% interval lies above that of the final-layer export on MC accuracy and below on gen "
        "exact match; against the `final-only` run's `merged/`, the ensemble export's interval "
        "lies below on gen exact match and the final-layer export's interval overlaps on both "
        "tasks, so these figures do not prefer either run's folder."
    )
    # Both mode exports alike, above final-only on both tasks (53.08 > 46.92).
    assert study.deployment(scored((80, 80), (120, 120), (120, 120))).endswith(
        "the final-layer export's interval lies above on MC accuracy and gen exact match, so the "
        "`mode` run's folder is the better one to deploy."
    )
    # The ensemble below its final layer on gen (26.09 < 33.46).
    assert study.deployment(scored((65, 80), (65, 40), (65, 80))).startswith(
        "Per these figures, deploy the `mode` run's `head=final` export, not its `merged/`: the "
        "ensemble export's 95% interval lies below that of the final-layer export on gen exact "
        "match; against the `final-only` run's `merged/`, the final-layer export's interval "
        "overlaps on both tasks"
    )
    # A folder not scored yet: a row of dashes, no judgement.
    missing = scored((65, 45), (57, 48), (65, 45))
    missing["deployed"]["scores"][final] = None
    assert study.deployed_table(missing)[-1].endswith("| - | - |")
    assert study.deployment(missing) == (
        "Not every folder was scored: which one to deploy is not judged."
    )


def test_the_deployed_scores_are_read_from_lm_eval_kept_and_timed_on_the_page(
    study, tmp_path, monkeypatch
):
    """lm_eval's results files (`<output_path>/<model>/results_<time>.json`) give the counts the
    rows use; the kept runs' JSON keeps them; the section states the added steps' wall time."""
    out = tmp_path / "study"
    rates = {"lm-eval-final-only": (0.325, 0.225), "lm-eval-mode": (0.285, 0.24)}
    for step, (mc, gen) in rates.items():
        folder = out / step / "__tmp__study__demo"
        folder.mkdir(parents=True)
        results = {
            "results": {
                "mode_arithmetic_mc": {"acc,none": mc, "acc_stderr,none": 0.03},
                "mode_arithmetic_gen": {"exact_match,answer": gen},
            },
            "n-samples": {
                task: {"original": 200, "effective": 200}
                for task in ("mode_arithmetic_mc", "mode_arithmetic_gen")
            },
        }
        (folder / "results_2026-01-01T00-00-00.json").write_text(json.dumps(results))
    for name in ("demo-mode", "demo-final-only"):
        (out / name).mkdir()
        (out / name / "metrics.jsonl").write_text(
            "\n".join(json.dumps({"step": s, "loss": 1.0}) for s in (2, 36))
        )
    found = study.read_deployed(out)
    assert found["scores"]["lm-eval-mode"] == {
        "mode_arithmetic_mc": {"correct": 57, "n": 200},
        "mode_arithmetic_gen": {"correct": 48, "n": 200},
    }
    assert found["scores"]["lm-eval-final-only"]["mode_arithmetic_mc"]["correct"] == 65
    assert found["scores"]["lm-eval-mode-final"] is None  # not scored yet
    assert found["steps"] == {"demo-mode": 36, "demo-final-only": 36}
    kept = json.loads(json.dumps(study.kept_runs({"runs": {}, "deployed": found})))
    assert kept["deployed"] == found

    minutes = {"curve": 10, "demo-mode": 5, "demo-final-only": 4, "export-final": 1,
               "lm-eval-final-only": 50, "lm-eval-mode": 55, "lm-eval-mode-final": 50}  # fmt: skip
    record = {"steps": {n: {"exit": 0, "seconds": 60.0 * m} for n, m in minutes.items()}}
    record["steps"]["lm-eval-mode-final"]["exit"] = None
    section = study.deployed_section({"deployed": found, "record": record})
    assert section[0] == "## Where users run it"
    assert "(`make demo`'s recipe `smollm2-arithmetic` as shipped, 36 steps, seed 0)" in section[2]
    assert section[-2] == (
        "These runs, the export and the scorings took 2 h 45 min of the wall time (demo-mode 5 "
        "min, demo-final-only 4 min, export-final 1 min, lm-eval-final-only 50 min, lm-eval-mode "
        "55 min, lm-eval-mode-final 50 min (not finished))."
    )  # 5 + 4 + 1 + 50 + 55 + 50 minutes; the curve is not one of them
    assert "Not every folder was scored" in "\n".join(section)


def test_a_study_without_the_harness_stops_before_it_runs_anything(study, monkeypatch, capsys):
    """The scorings come last: without lm-evaluation-harness the study says so and exits 2 at
    once, not hours in."""
    real = study.importlib.util.find_spec
    monkeypatch.setattr(
        study.importlib.util, "find_spec", lambda name: None if name == "lm_eval" else real(name)
    )
    monkeypatch.setattr(study, "run_study", lambda *a, **k: pytest.fail("the study ran"))
    monkeypatch.setattr(sys, "argv", ["study.py", "--continue"])
    assert study.main() == 2
    assert 'pip install "mode-cli[harness]"' in capsys.readouterr().err
