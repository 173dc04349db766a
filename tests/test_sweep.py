"""`mode train -m`: expanding a sweep with Hydra's grammar, validating every combination before any
run, running them in turn, the comparison table, failures and Ctrl-C."""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path

import pytest

from mode_cli.errors import ModeError
from mode_cli.eval.report import latest_report
from mode_cli.train.recipe import FinetuneRecipe
from mode_cli.train.seeds import comparisons, group_runs
from mode_cli.train.sweep import (
    Sweep,
    SweepRun,
    collect_results,
    expand,
    final_train_loss,
    group_rows,
    plan_sweep,
    run_name,
    sweep_figure,
    table_rows,
)

TINY = "recipe=tiny-llama-alpaca"
# Greedy answer generation is the slow part of a tiny run's report: off unless a test needs it.
FAST_EVAL = ("eval.max_examples=8", "eval.compare_base=false", "eval.answers=off")
QUICK = ("train.max_steps=2", *FAST_EVAL, "merge=false")


def test_expansion_is_the_product_in_hydra_order():
    combos, swept = expand(
        [TINY, "loss=mode,final-only", "train.lr=1e-4,2e-4", "train.max_steps=range(1,3)"]
    )
    assert swept == ["loss", "train.lr", "train.max_steps"]
    assert len(combos) == 8
    # The first swept key varies slowest, the last fastest; fixed overrides ride along.
    assert combos[0] == [
        ("recipe", "tiny-llama-alpaca"),
        ("loss", "mode"),
        ("train.lr", "0.0001"),
        ("train.max_steps", "1"),
    ]
    assert [dict(c)["train.max_steps"] for c in combos[:2]] == ["1", "2"]
    assert [dict(c)["loss"] for c in combos] == ["mode"] * 4 + ["final-only"] * 4


def test_choice_glob_and_quoted_values_expand_as_in_hydra():
    combos, swept = expand([TINY, "layers=glob(last*,exclude=last6)", "data.train='a,b.json'"])
    assert swept == ["layers"]
    assert [dict(c)["layers"] for c in combos] == ["last2", "last3", "last4"]
    assert {dict(c)["data.train"] for c in combos} == {"'a,b.json'"}  # one value, not a sweep
    combos, _ = expand([TINY, "router=choice(token,scalar)", "recipe=tiny-llama-alpaca"])
    assert [dict(c)["router"] for c in combos] == ["token", "scalar"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lr=interval(0,1)", "interval"),
        ("output_dir=a,b", "output_dir cannot be swept"),
        ("layers=glob(nothing*)", "matches no option"),
        ("train.lr=1e-4,", "Could not parse"),
    ],
)
def test_sweeps_that_cannot_run_are_refused(override, message):
    with pytest.raises(ModeError, match=message):
        expand([TINY, override])


def test_plan_composes_every_combination_into_its_own_folder(tmp_path):
    sweep = plan_sweep(
        [TINY, "loss=mode,final-only", "merge=true,false", f"output_dir={tmp_path}"],
        check_hardware=False,
    )
    assert sweep.directory == tmp_path
    assert [run.out.name for run in sweep.runs] == [
        "0-loss-mode_merge-True",
        "1-loss-mode_merge-False",
        "2-loss-final-only_merge-True",
        "3-loss-final-only_merge-False",
    ]
    cfgs = [run.cfg for run in sweep.runs]
    assert [c.loss.name for c in cfgs] == ["mode", "mode", "final-only", "final-only"]
    assert [c.merge.enabled for c in cfgs] == [True, False, True, False]
    assert [c.output_dir for c in cfgs] == [str(run.out) for run in sweep.runs]
    assert not tmp_path.joinpath("sweep.json").exists()  # planning writes nothing
    # Nothing swept: one run, in the sweep's layout.
    single = plan_sweep([TINY, f"output_dir={tmp_path}"], check_hardware=False)
    assert single.swept_keys == [] and [run.out.name for run in single.runs] == ["0"]


def test_run_names_are_shell_and_override_safe():
    name = run_name(3, {"+data.train": "'a b,c.json'", "train.lr": "0.0002"}, 2)
    assert name == "03-data.train-a-b-c.json_train.lr-0.0002"
    assert run_name(0, {}, 1) == "0"


def test_a_bad_value_in_the_second_combination_fails_before_anything_runs(
    mode, tmp_path, monkeypatch
):
    def must_not_run(self):
        raise AssertionError("a run started")

    monkeypatch.setattr(FinetuneRecipe, "run", must_not_run)
    out = tmp_path / "sweep"
    code, _, err = mode("train", "-m", TINY, "train.max_steps=5,0", f"output_dir={out}")
    assert code == 2
    assert "1 of 2 combinations are invalid" in err
    assert "run 1 (train.max_steps=0)" in err and "expected a number > 0" in err
    assert not out.exists()
    # The same for a typo in a config group option, named once for all its combinations.
    code, _, err = mode("train", "-m", TINY, "loss=mode,nope", "train.lr=1e-4,2e-4")
    assert code == 2 and "runs 2, 3:" in err and "loss/nope" in err


def test_dry_run_lists_the_plan_and_trains_nothing(mode, tmp_path, monkeypatch):
    monkeypatch.setattr(FinetuneRecipe, "run", lambda self: pytest.fail("a run started"))
    out = tmp_path / "sweep"
    code, stdout, err = mode(
        "train", "-m", "--dry-run", TINY, "loss=mode,final-only", f"output_dir={out}"
    )
    assert code == 0, err
    assert "2 combinations composed and validated" in err
    assert "0-loss-mode" in stdout and "1-loss-final-only" in stdout
    assert not out.exists()


def test_sweep_runs_each_combination_and_writes_the_comparison_table(mode, tmp_path):
    out = tmp_path / "sweep"
    code, stdout, err = mode(
        "train", "-m", TINY, "loss=mode,final-only", "train.max_steps=5", "merge=false",
        *FAST_EVAL, f"output_dir={out}",
    )  # fmt: skip
    assert code == 0, err
    runs = sorted(p for p in out.iterdir() if p.is_dir())
    assert [p.name for p in runs] == ["0-loss-mode", "1-loss-final-only"]
    for run in runs:
        assert (run / "config.yaml").is_file() and (run / "adapter").is_dir()
        assert not (run / "merged").exists()

    summary = json.loads((out / "sweep.json").read_text())
    assert summary["swept"] == ["loss"]
    rows = summary["runs"]
    assert [r["swept"] for r in rows] == [{"loss": "mode"}, {"loss": "final-only"}]
    assert [r["status"] for r in rows] == ["ok", "ok"]
    for row, run in zip(rows, runs, strict=True):
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        last = [r for r in records if "loss" in r][-1]
        assert last["step"] == 5 and row["final_train_loss"] == last["loss"]
        report = json.loads(latest_report(run).read_text())
        assert row["eval_loss"]["final"] == report["layers"][-1]["tuned"]["loss"]
        assert row["wall_s"] > 0
    mode_row, final_row = rows
    # MoDE over the last 3 of 4 layers: the ensemble, and layers 2 and 3 beside the final one.
    assert mode_row["eval_loss"]["ensemble"] is not None
    assert set(mode_row["eval_loss"]["layers"]) == {"2", "3"}
    assert final_row["eval_loss"]["ensemble"] is None and final_row["eval_loss"]["layers"] == {}

    table = (out / "sweep.md").read_text()
    header = "| # | run | overrides | train loss | eval final | eval ensemble | eval L2 | eval L3 |"
    assert header in table
    lines = [line for line in table.splitlines() if line.startswith("| 1 |")]
    assert len(lines) == 1 and "| loss=final-only |" in lines[0] and "| - | - | - |" in lines[0]
    assert f"{final_row['final_train_loss']:.4f}" in lines[0]
    # The printed table (folded to the terminal's width): a row per run, both finished.
    assert f"sweep: {out}" in " ".join(stdout.split()) and stdout.count(" ok ") == 2


def test_a_failed_run_is_recorded_and_the_sweep_goes_on(mode, tmp_path):
    out = tmp_path / "sweep"
    # layers.k=9 passes validation but the 4-layer model has no 9 last layers; the second run
    # stops on its step budget after 1 of 2 steps (a partial result, not a failure).
    code, _, err = mode(
        "train", "-m", TINY, "layers.k=9,2", *QUICK, "train.stop_after_steps=1",
        f"output_dir={out}",
    )  # fmt: skip
    assert code == 1
    assert "1 of 2 runs failed" in err
    rows = json.loads((out / "sweep.json").read_text())["runs"]
    assert [r["status"] for r in rows] == ["failed", "stopped"]
    assert "layers" in rows[0]["error"] and rows[1]["error"] is None
    assert rows[1]["final_train_loss"] is not None and rows[1]["eval_loss"] == {}
    assert (Path(rows[1]["dir"]) / "checkpoints").is_dir()
    assert not Path(rows[0]["dir"]).exists()


def test_ctrl_c_stops_the_sweep_and_keeps_the_table(mode, tmp_path, monkeypatch):
    started = []

    def interrupted(self):
        started.append(self.cfg.loss.name)
        raise KeyboardInterrupt

    monkeypatch.setattr(FinetuneRecipe, "run", interrupted)
    out = tmp_path / "sweep"
    code, _, _ = mode("train", "-m", TINY, "loss=mode,final-only", f"output_dir={out}")
    assert code == 130
    assert started == ["mode"]  # the second run never started
    rows = json.loads((out / "sweep.json").read_text())["runs"]
    assert [r["status"] for r in rows] == ["interrupted", "pending"]
    # A second sweep into the same folder would overwrite this table: refused.
    code, _, err = mode("train", "-m", TINY, "loss=mode,final-only", f"output_dir={out}")
    assert code == 2 and "already holds a sweep" in err
    # ... unless its runs are continued from their checkpoints.
    sweep = plan_sweep([TINY, "loss=mode,final-only", f"output_dir={out}", "resume=auto"])
    assert len(sweep.runs) == 2


def test_results_come_from_the_newest_report_and_the_last_logged_loss(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert final_train_loss(run) is None and latest_report(run) is None
    (run / "metrics.jsonl").write_text(
        '{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.5}\n{"step": 2, "eval_acc": 0.1}\n{"st'
    )
    assert final_train_loss(run) == 2.5

    def report(final: float, ensemble: float | None) -> str:
        layers = [
            {"layer": 1, "selected": False, "tuned": {"loss": 9.0}},
            {"layer": 2, "selected": True, "tuned": {"loss": 5.0}},
            {"layer": 3, "selected": True, "tuned": {"loss": final}},
        ]
        ens = None if ensemble is None else {"tuned": {"loss": ensemble}, "base": None}
        return json.dumps({"layers": layers, "ensemble": ens})

    for stamp, (final, ens) in {
        "20260101-000000": (2.0, None),
        "20260102-000000": (1.0, 0.5),
    }.items():
        (run / "eval" / stamp).mkdir(parents=True)
        (run / "eval" / stamp / "report.json").write_text(report(final, ens))
    assert latest_report(run) == run / "eval" / "20260102-000000" / "report.json"

    entry = SweepRun(0, "tiny", [], {"loss": "mode"}, run)
    collect_results(entry)
    assert entry.train_loss == 2.5
    assert entry.eval_loss == {"final": 1.0, "ensemble": 0.5, "layers": {"2": 5.0}}
    header, rows = table_rows(Sweep(tmp_path, [], ["loss"], [entry]))
    assert header[3:7] == ["train loss", "eval final", "eval ensemble", "eval L2"]
    assert rows[0][3:7] == ["2.5000", "1.0000", "0.5000", "5.0000"]


def test_the_sweep_folder_defaults_to_outputs_recipe_time(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sweep = plan_sweep([TINY, "loss=mode,final-only"], check_hardware=False)
    assert sweep.directory.parent == Path("outputs") / "tiny-llama-alpaca"
    assert sweep.directory.name.endswith("-sweep")
    assert all(run.out.parent == sweep.directory for run in sweep.runs)


# ---------------------------------------------------------------------------- seeds


def test_seeds_are_grouped_and_compared_as_a_hand_computation_says(mode, tmp_path):
    """The acceptance sweep (with a short eval): two loss recipes, two seeds each."""
    out = tmp_path / "sweep"
    code, stdout, err = mode(
        "train", "-m", TINY, "loss=mode,final-only", "train.seed=0,1", "train.max_steps=5",
        "merge=false", "eval.max_examples=8", "eval.compare_base=false",
        "eval.answer_examples=6", "eval.max_new_tokens=8", f"output_dir={out}",
    )  # fmt: skip
    assert code == 0, err
    runs = sorted(p for p in out.iterdir() if p.is_dir())
    assert [p.name for p in runs] == [
        "0-loss-mode_train.seed-0",
        "1-loss-mode_train.seed-1",
        "2-loss-final-only_train.seed-0",
        "3-loss-final-only_train.seed-1",
    ]

    def own_metrics(run: Path) -> dict:
        """What the run's own files say, read without the sweep's code."""
        steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        report = json.loads(latest_report(run).read_text())
        values = {
            "train_loss": [r for r in steps if "loss" in r][-1]["loss"],
            "eval_final": report["layers"][-1]["tuned"]["loss"],
            "em_final": report["answers"]["heads"]["final"]["correct"] / 6,
        }
        if report["ensemble"]:
            values["eval_ensemble"] = report["ensemble"]["tuned"]["loss"]
            values["em_ensemble"] = report["answers"]["heads"]["ensemble"]["correct"] / 6
            for row in report["layers"][1:3]:
                values[f"eval_L{row['layer']}"] = row["tuned"]["loss"]
        return values

    mode_runs = [own_metrics(run) for run in runs[:2]]
    final_runs = [own_metrics(run) for run in runs[2:]]
    assert mode_runs[0]["train_loss"] != mode_runs[1]["train_loss"]  # the seed matters

    seeds = json.loads((out / "sweep.json").read_text())["seeds"]
    assert seeds["key"] == "train.seed"
    groups = {g["settings"]["loss"]: g for g in seeds["groups"]}
    assert list(groups) == ["mode", "final-only"]
    assert groups["mode"]["runs"] == [0, 1] and groups["mode"]["seeds"] == [0, 1]
    table = (out / "sweep.md").read_text()
    for name, own in (("mode", mode_runs), ("final-only", final_runs)):
        for key in own[0]:
            values = [run[key] for run in own]
            got = groups[name]["metrics"][key]
            assert got["n"] == 2 and got["values"] == {"0": values[0], "1": values[1]}
            assert got["mean"] == pytest.approx(statistics.mean(values), abs=1e-12)
            assert got["std"] == pytest.approx(statistics.stdev(values), abs=1e-12)
        line = next(row for row in table.splitlines() if row.startswith(f"| loss={name} |"))
        values = [run["eval_final"] for run in own]
        spread = f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"
        assert f"| {spread} |" in line
    assert groups["final-only"]["metrics"]["eval_ensemble"] is None

    (comparison,) = seeds["comparisons"]
    assert comparison["key"] == "loss"
    assert comparison["first"] == {"loss": "mode"} and comparison["second"] == {
        "loss": "final-only"
    }
    for key in ("train_loss", "eval_final", "em_final"):
        diffs = [m[key] - f[key] for m, f in zip(mode_runs, final_runs, strict=True)]
        mean, sd = statistics.mean(diffs), statistics.stdev(diffs)
        half = 12.7062 * sd / math.sqrt(2)  # t(0.975, 1 degree of freedom)
        got = comparison["metrics"][key]
        assert got["n"] == 2 and got["seeds"] == [0, 1]
        assert got["mean"] == pytest.approx(mean, abs=1e-12)
        assert (got["low"], got["high"]) == pytest.approx((mean - half, mean + half), abs=1e-4)
        assert got["excludes_zero"] == (mean - half > 0 or mean + half < 0)
    assert comparison["metrics"]["eval_ensemble"] is None  # final-only has no ensemble
    got = comparison["metrics"]["eval_final"]
    row = f"| loss: mode - final-only | - | eval final | 2 | {got['mean']:+.4f} | "
    row += f"[{got['low']:+.4f}, {got['high']:+.4f}] |"
    assert row in table
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    flat = " ".join(stdout.split())
    assert "mean ± std over seeds" in flat and "paired by seed" in flat


def fake_run(index: int, swept: dict, train_loss: float, final: float, em: float | None = None):
    run = SweepRun(index, "tiny", [], swept, Path(f"/runs/{index}"), status="ok")
    run.train_loss = train_loss
    run.eval_loss = {"final": final, "ensemble": None, "layers": {}}
    run.answers = {} if em is None else {"final": em}
    return run


def test_groups_compare_only_when_they_differ_in_one_setting_and_plot_each_seed():
    runs = []
    for loss, lr, shift in (("mode", "1", 0.0), ("mode", "2", 0.5), ("final-only", "1", 1.0)):
        for seed in (0, 1, 2):
            swept = {"loss": loss, "train.lr": lr, "train.seed": str(seed)}
            runs.append(fake_run(len(runs), swept, 2.0 + shift + 0.1 * seed, 3.0 - shift, 0.5))
    runs[-1].status = "failed"  # seed 2 of final-only: not counted
    sweep = Sweep(Path("/sweep"), [], ["loss", "train.lr", "train.seed"], runs)
    groups = group_runs(runs, sweep.swept_keys)
    assert [g.label() for g in groups] == [
        "loss=mode train.lr=1",
        "loss=mode train.lr=2",
        "loss=final-only train.lr=1",
    ]
    found = comparisons(groups)
    # mode/1 vs mode/2 (train.lr) and mode/1 vs final-only/1 (loss); mode/2 vs final-only/1
    # differ in both and are not compared.
    assert [(c.label(), c.shared()) for c in found] == [
        ("train.lr: 1 - 2", "loss=mode"),
        ("loss: mode - final-only", "train.lr=1"),
    ]
    lr_diff = found[0].difference("train_loss")
    assert lr_diff["mean"] == pytest.approx(-0.5) and lr_diff["std"] == pytest.approx(0.0)
    assert lr_diff["excludes_zero"]  # no spread at all: the interval is the point -0.5
    loss_diff = found[1].difference("eval_final")
    assert loss_diff["seeds"] == [0, 1] and loss_diff["mean"] == pytest.approx(1.0)
    assert found[1].difference("em_final")["mean"] == pytest.approx(0.0)
    assert not found[1].difference("em_final")["excludes_zero"]
    header, rows = group_rows(sweep)
    assert header == ["group", "seeds", "train loss", "eval final", "EM final"]
    assert rows[2][:4] == [
        "loss=final-only train.lr=1",
        "0, 1",
        "3.0500 ± 0.0707",
        "2.0000 ± 0.0000",
    ]

    figure = sweep_figure(sweep)
    train_ax = figure.axes[0]
    assert train_ax.get_title() == "train loss"
    dots = [c.get_offsets().tolist() for c in train_ax.collections if c.get_label() == "seeds"]
    assert [[x for x, _ in group] for group in dots] == [[0, 0, 0], [1, 1, 1], [2, 2]]
    assert [[y for _, y in group] for group in dots] == [
        pytest.approx([2.0, 2.1, 2.2]),
        pytest.approx([2.5, 2.6, 2.7]),
        pytest.approx([3.0, 3.1]),
    ]
    assert [t.get_text() for t in train_ax.get_xticklabels()] == [g.label() for g in groups]


def test_a_continued_sweep_keeps_finished_runs_and_resumes_the_rest(mode, tmp_path, monkeypatch):
    """`resume=auto` on a sweep folder: a run that finished (its end-of-training report is of
    train.max_steps) is kept as it is, with its wall time; the one Ctrl-C stopped runs again, and
    its wall time counts both sittings."""
    out = tmp_path / "sweep"
    args = ("train", "-m", TINY, "loss=mode,final-only", *QUICK, f"output_dir={out}")
    real_run = FinetuneRecipe.run

    def stopped_on_final_only(self):
        if self.cfg.loss.name == "final-only":
            time.sleep(1.0)  # a first sitting longer than setting a run up
            raise KeyboardInterrupt
        return real_run(self)

    monkeypatch.setattr(FinetuneRecipe, "run", stopped_on_final_only)
    code, _, _ = mode(*args)
    assert code == 130
    first = json.loads((out / "sweep.json").read_text())["runs"]
    assert [r["status"] for r in first] == ["ok", "interrupted"]
    kept = Path(first[0]["dir"])
    metrics = (kept / "metrics.jsonl").read_text()

    ran, second_sitting = [], []

    def spied(self):
        ran.append(self.cfg.loss.name)
        start = time.perf_counter()
        try:
            return real_run(self)
        finally:
            second_sitting.append(time.perf_counter() - start)

    monkeypatch.setattr(FinetuneRecipe, "run", spied)
    code, out_text, _ = mode(*args, "resume=auto")
    assert code == 0, out_text
    assert ran == ["final-only"]
    rows = json.loads((out / "sweep.json").read_text())["runs"]
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert rows[0]["wall_s"] == first[0]["wall_s"]
    assert rows[0]["eval_loss"] == first[0]["eval_loss"]
    assert rows[0]["final_train_loss"] == first[0]["final_train_loss"]
    assert (kept / "metrics.jsonl").read_text() == metrics
    assert rows[1]["eval_loss"]["final"] is not None
    assert rows[1]["wall_s"] >= first[1]["wall_s"] + second_sitting[0]


def test_a_report_of_fewer_steps_does_not_count_as_finished(tmp_path):
    """Only the end-of-training report of train.max_steps marks a run done: a report `mode eval`
    wrote, or one of a shorter budget, leaves the run to resume."""
    from mode_cli.train.sweep import finished_earlier

    sweep = plan_sweep([TINY, "train.max_steps=4", f"output_dir={tmp_path}", "resume=auto"])
    run = sweep.runs[0]
    report = run.out / "eval" / "20260101-000000" / "report.json"
    assert not finished_earlier(run)
    report.parent.mkdir(parents=True)
    for source, done in (
        ({"kind": "run", "checkpoint": str(run.out), "step": 4}, True),
        ({"kind": "run", "checkpoint": str(run.out), "step": 2}, False),
        ({"kind": "run", "checkpoint": str(run.out)}, False),
        ({"kind": "merged", "checkpoint": str(run.out)}, False),
    ):
        report.write_text(json.dumps({"source": source}))
        assert finished_earlier(run) is (done and not run.cfg.merge.enabled), source
    (run.out / "merged").mkdir()
    report.write_text(json.dumps({"source": {"kind": "run", "step": 4}}))
    assert finished_earlier(run)
    without_resume = plan_sweep([TINY, "train.max_steps=4", f"output_dir={tmp_path}"]).runs[0]
    assert not finished_earlier(without_resume)
