"""The study in docs/study.md: does MoDE help on the default model and task, by more than noise?

    make study                                   # = python scripts/study.py
    python scripts/study.py --continue           # go on with a stopped study in outputs/study
    python scripts/study.py --render-only        # rewrite docs/study.md from outputs/study

SmolLM2-135M-Instruct in NF4 (`package:smollm2`, recipe `smollm2-arithmetic`) on the bundled
arithmetic word problems (2,000 train, 200 eval rows). Five methods, five seeds each, every run
`STEPS` optimizer steps of 4 examples:

    final-only       LoRA r16, plain cross-entropy on the last layer (the baseline)
    mode             LoRA r16 + MoDE over the last 3 layers, with distillation
    mode-nodistill   LoRA r16 + MoDE, no distillation
    dora             DoRA r16, final-only
    dora + mode      DoRA r16 + MoDE

First, one final-only run of half as many steps again (`CURVE_STEPS`) logs its eval loss every
`CURVE_EVERY` steps on the rows the reports read: the curve, and at its end what the baseline
gains from 50% more steps, known before the hours of sweeps. The methods run as two
`mode train -m` sweeps (LoRA: three losses; DoRA: two), so each sweep folder also holds the
sweep's own seed-paired comparisons (sweep.md). Then `mode eval ... compare=base` on one run
measures the base before tuning (per-layer losses and answers), the same for every method.

Last, where users run it: a `mode` and a `final-only` run at the demo's budget (the recipe as
shipped, its own `train.max_steps`, seed 0), each writing the folder a user deploys (`merged/`:
the MoDE ensemble export for `mode`, the plain model for `final-only`); `mode export ...
head=final` of the `mode` run (its final layer alone); and `lm_eval --model hf` on the three
folders, mode's two bundled tasks, every item (`trust_remote_code=True` for the ensemble export).
The page gives each folder's scores with 95% Wilson intervals and which to deploy per them.

Every sweep run scores greedy answers to all 200 eval rows at the end of training (on by default
for a model this size) from a dequantized fp32 copy. The script then writes docs/study.md and its
figures under docs/study/: the table (mean ± std over seeds), paired differences against the
baseline with 95% t-intervals, the curve, per-layer loss before and after (seed 0 of each method),
trainable parameters, time per step, a verdict from Holm-adjusted paired t-tests, and the deployed
folders' lm-evaluation-harness scores. The runs' numbers (and those scores) are kept in
docs/study/runs-<STEPS>.json; the page sets those of other budgets (kept by earlier renderings with
another STEPS) beside its own. Runs go to outputs/study/, one folder per step (about 1 GB, and 0.5
GB for each of the three deployed folders: 135M weights in fp32). A plain `make study` starts from
nothing; `--continue` keeps the steps a stopped study finished (new steps, added at the end, run
after them), resumes the curve's and the sweeps' runs from their checkpoints (every 50 steps) and
starts any other unfinished step again.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402
from safetensors import safe_open  # noqa: E402

from mode_cli.eval.harness import BUNDLED_TASKS, TASK_SCORES  # noqa: E402
from mode_cli.eval.harness import command as harness_command  # noqa: E402
from mode_cli.eval.report import latest_report  # noqa: E402
from mode_cli.eval.stats import holm, mean_std, t_interval, wilson_interval  # noqa: E402
from mode_cli.train.checkpoint import complete_checkpoints  # noqa: E402
from mode_cli.train.progress import METRICS_FILE  # noqa: E402
from mode_cli.train.sweep import eval_losses, exact_match, train_records  # noqa: E402

RECIPE = "smollm2-arithmetic"
STEPS = 500
SEEDS = (0, 1, 2, 3, 4)
CURVE_STEPS = 3 * STEPS // 2
CURVE_EVERY = 50
# The curve's evals must land on the study's budget and on the curve's last step: the page reads
# the baseline's eval loss at both.
assert STEPS % CURVE_EVERY == 0 and CURVE_STEPS % CURVE_EVERY == 0, "CURVE_EVERY divides both"
FLAT = 0.05  # the longer run has flattened when its last fifth moves its eval loss less than this
EVAL_ROWS = 200  # exact match on every eval row
LAYER_ROWS = 100  # the per-layer losses (logit lens over 30 layers) on the first 100
# The curve's evals read the same rows as the runs' reports, so its last point and the baseline
# runs' eval loss compare directly.
CURVE_EXAMPLES = LAYER_ROWS
TRAIN_ROWS = 2000
BATCH = 4  # examples per optimizer step: the recipe's micro-batch 4, no accumulation
MAX_NEW_TOKENS = 64  # eval.max_new_tokens, the default
THREADS = 2
UNTIMED = 300  # seconds of wall time outside every step's record the page calls out
SAMPLE_S = 30  # how often the record samples the load and saves itself
SUSPENDED_S = 60  # a sample this much later than due: the study's processes were stopped
# What every study run shares, beyond the recipe: the step budget, the whole eval split for the
# answers and half of it for the per-layer report (reading 30 layers through a 49k-word head is
# the report's slow part), no merged model (the runs are read, not shipped), a checkpoint every
# 50 steps (what a continued study resumes from). The base is measured once (the `base` step), not in every run.
COMMON = [
    f"train.max_steps={STEPS}",
    "train.warmup_steps=10",
    f"train.threads={THREADS}",
    f"data.max_eval_examples={EVAL_ROWS}",
    f"eval.max_examples={LAYER_ROWS}",
    f"eval.answer_examples={EVAL_ROWS}",
    "eval.compare_base=false",
    "merge=false",
    "checkpoint.every_steps=50",
]
SWEEPS = {
    "lora": ["adapter=lora", "loss=final-only,mode,mode-nodistill"],
    "dora": ["adapter=dora", "loss=final-only,mode"],
}
OUT = ROOT / "outputs" / "study"
DOC = ROOT / "docs" / "study.md"
FIGURES = ROOT / "docs" / "study"


@dataclass(frozen=True)
class Method:
    name: str
    sweep: str
    loss: str
    routed: bool  # decodes with the ensemble

    @property
    def head(self) -> str:
        """The head the method's runs decode with: the ensemble with a router, else the final."""
        return "ensemble" if self.routed else "final"


METHODS = (
    Method("final-only", "lora", "final-only", False),
    Method("mode", "lora", "mode", True),
    Method("mode-nodistill", "lora", "mode-nodistill", True),
    Method("dora", "dora", "final-only", False),
    Method("dora + mode", "dora", "mode", True),
)
BASELINE = METHODS[0]


def mode_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "mode_cli", *args]


def overridden(common: list[str], *overrides: str) -> list[str]:
    """`common` with each `key=value` of `overrides` in place of the same key's, or added."""
    keys = {o.split("=", 1)[0]: o for o in overrides}
    kept = [keys.pop(c.split("=", 1)[0], c) for c in common]
    return kept + list(keys.values())


def shown(command: list[str]) -> str:
    """A command as a person would type it: `python -m mode_cli` as `mode`, `python -m lm_eval`
    as `lm_eval`."""
    programs = {"mode_cli": "mode", "lm_eval": "lm_eval"}
    module = command[2] if command[1:2] == ["-m"] and len(command) > 2 else None
    words = [programs[module], *command[3:]] if module in programs else command
    # Paths inside the repository as a person in its root would write them.
    return " ".join(shlex.quote(w.replace(f"{ROOT}/", "")) for w in words)


# ---------------------------------------------------------------------------- running


class StudyRecord:
    """`<out>/study.json`: what ran, for how long, and how loaded the machine was, rewritten every
    30 s while the study runs, so a study stopped part-way (`--continue` goes on) keeps its time.

    wall_s counts every invocation, the work an interruption lost included; load_mean is the
    machine's 1-minute load average over the samples (how much else ran). suspended lists the
    times the study's processes stood stopped (SIGSTOP, a machine asleep) while it ran: a sample
    that came more than SUSPENDED_S late, with the step it stopped, so the page can say which
    step's time holds them."""

    def __init__(self, out: Path, *, continued: bool) -> None:
        self.path = out / "study.json"
        if continued and self.path.is_file():
            self.data = json.loads(self.path.read_text())
        else:
            self.data = {
                "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "wall_s": 0.0,
                "cpus": os.cpu_count(),
                "invocations": 0,
                "load_mean": None,
                "load_samples": 0,
                "steps": {},
            }
        self.data.setdefault("suspended", [])
        self.data["invocations"] += 1
        self.running: tuple[str, float, float] | None = None  # name, earlier seconds, its start
        self.before = self.data["wall_s"]
        self.begin = time.perf_counter()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)

    def sample(self) -> None:
        due = time.perf_counter() + SAMPLE_S
        while not self.stop.wait(SAMPLE_S):
            now = time.perf_counter()
            self.late(now - due)
            due = now + SAMPLE_S
            with self.lock:
                n, mean = self.data["load_samples"], self.data["load_mean"] or 0.0
                self.data["load_mean"] = (mean * n + os.getloadavg()[0]) / (n + 1)
                self.data["load_samples"] = n + 1
            self.save()

    def late(self, seconds: float) -> None:
        """A sample came `seconds` after it was due: past SUSPENDED_S the study stood stopped."""
        if seconds <= SUSPENDED_S:
            return
        with self.lock:
            self.data["suspended"].append(
                {
                    "until": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "seconds": seconds,
                    "step": self.running[0] if self.running else None,
                }
            )

    def save(self) -> None:
        with self.lock:
            self.data["wall_s"] = self.before + time.perf_counter() - self.begin
            if self.running is not None:
                name, earlier, start = self.running
                self.data["steps"][name]["seconds"] = earlier + time.perf_counter() - start
            staging = self.path.with_suffix(".json.tmp")
            staging.write_text(json.dumps(self.data, indent=2) + "\n")
            os.replace(staging, self.path)

    def step_started(self, name: str, command: str) -> None:
        """A step begins: it stands in the record unfinished (exit None), and every save keeps its
        seconds up to date, so a stop loses at most the last 30 s of its time. A continued step
        carries on from the seconds its earlier sittings recorded."""
        with self.lock:
            earlier = self.data["steps"].get(name, {}).get("seconds", 0.0)
            self.data["steps"][name] = {"command": command, "exit": None, "seconds": earlier}
            self.running = (name, earlier, time.perf_counter())
        self.save()

    def step_done(self, name: str, step: dict) -> None:
        with self.lock:
            assert self.running is not None and self.running[0] == name, "step_started first"
            _, earlier, _ = self.running
            self.running = None
            self.data["steps"][name] = step | {"seconds": earlier + step["seconds"]}
        self.save()

    def __enter__(self) -> StudyRecord:
        self.save()
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self.save()


def run_step(name: str, command: list[str], log_dir: Path, *, shown_as: list[str]) -> dict:
    """Run one command with its output appended to `log_dir/<name>.log`; its wall time and exit
    code (`shown_as`: the command as the page names it)."""
    log = log_dir / f"{name}.log"
    print(f"[{datetime.now():%H:%M:%S}] {name}: {shown(command)}", flush=True)
    start = time.perf_counter()
    with log.open("a") as handle:
        code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    seconds = time.perf_counter() - start
    print(
        f"[{datetime.now():%H:%M:%S}] {name}: exit {code} after {seconds / 60:.1f} min", flush=True
    )
    return {"command": shown(shown_as), "exit": code, "seconds": seconds, "log": str(log)}


@dataclass(frozen=True)
class Step:
    """One command of the study. `command` is made when its turn comes (it may read what an
    earlier step wrote); `needs`: the steps that must have finished first; `resumes`: a stopped
    step goes on from its runs' checkpoints (`resume=auto`) instead of starting again."""

    command: Callable[[], list[str]]
    needs: tuple[str, ...] = ()
    resumes: bool = False


@dataclass(frozen=True)
class Deployed:
    """A folder a user deploys, as the study scores it with lm-evaluation-harness: `step` scores
    it (its results under `<out>/<step>`), `made_by` writes it, at `<out>/<where>`."""

    step: str
    label: str  # the table's row
    called: str  # in a sentence
    made_by: str
    where: str
    ensemble: bool  # the MoDE ensemble export: loads with trust_remote_code=True


# The demo-budget runs: the recipe as shipped (`make demo`), one per loss, seed 0, merged/ on.
DEMO_SEED = 0
DEMO_RUNS = {"demo-mode": "mode", "demo-final-only": "final-only"}
# Which folder is which: `deployment` reads them in this order (baseline, ensemble, final).
DEPLOYED = (
    Deployed("lm-eval-final-only", "`final-only` merged/", "the `final-only` run's `merged/`",
             "demo-final-only", "demo-final-only/merged", False),
    Deployed("lm-eval-mode", "`mode` merged/ (ensemble)", "the ensemble export", "demo-mode",
             "demo-mode/merged", True),
    Deployed("lm-eval-mode-final", "`mode` head=final", "the final-layer export", "export-final",
             "export-final", False),
)  # fmt: skip
# The bundled tasks' scores in lm-evaluation-harness's results: (task, metric key, page name).
HARNESS_NAMES = {"mode_arithmetic_mc": "MC accuracy", "mode_arithmetic_gen": "gen exact match"}
HARNESS_SCORES = tuple((task, key, HARNESS_NAMES[task]) for task, key in TASK_SCORES.items())


def harness_step(out: Path, folder: Path, step: str) -> list[str]:
    """`lm_eval` on `folder` as `mode_cli.eval.harness.command` says (the bundled tasks, every
    item, `trust_remote_code=True` for an ensemble export), its results under `<out>/<step>`."""
    words = harness_command(folder, BUNDLED_TASKS)
    return [sys.executable, "-m", "lm_eval", *words[1:], "--output_path", str(out / step)]


def study_steps(out: Path) -> dict[str, Step]:
    """The study's commands by name, in the order they run: first the baseline's longer curve
    (whether the study's budget reaches the baseline's floor is known before the hours of
    sweeps), then the sweeps (the table), then the base before tuning (read through a finished
    baseline run); last, what a user deploys: a `mode` and a `final-only` run at the demo's
    budget (each writing merged/), the `mode` run's final-layer export, and lm-evaluation-harness
    on the three folders. Each writes into `<out>/<name>`; added steps go at the end, so a study
    continued with `--continue` runs them after the ones it has."""
    steps: dict[str, Step] = {}
    steps["curve"] = Step(lambda: mode_command(
        "train", f"recipe={RECIPE}", "loss=final-only", f"output_dir={out / 'curve'}",
        *overridden(COMMON, f"train.max_steps={CURVE_STEPS}", f"eval.every_steps={CURVE_EVERY}",
                    f"eval.max_examples={CURVE_EXAMPLES}", "eval.answers=off"),
    ), resumes=True)  # fmt: skip
    steps |= {
        sweep: Step(lambda swept=swept, sweep=sweep: mode_command(
            "train", "-m", f"recipe={RECIPE}", *swept,
            "train.seed=" + ",".join(map(str, SEEDS)), *COMMON, f"output_dir={out / sweep}",
        ), resumes=True)
        for sweep, swept in SWEEPS.items()
    }  # fmt: skip
    steps["base"] = Step(lambda: mode_command(
        "eval", f"checkpoint={run_dir(out, BASELINE, SEEDS[0])}", "compare=base",
        f"examples={EVAL_ROWS}", f"eval.max_examples={LAYER_ROWS}",
        f"eval.output_dir={out / 'base' / 'eval'}", f"train.threads={THREADS}",
    ), needs=(BASELINE.sweep,))  # fmt: skip
    steps |= {
        name: Step(lambda name=name, loss=loss: mode_command(
            "train", f"recipe={RECIPE}", f"loss={loss}", f"train.seed={DEMO_SEED}",
            f"train.threads={THREADS}", f"output_dir={out / name}",
        ))
        for name, loss in DEMO_RUNS.items()
    }  # fmt: skip
    steps["export-final"] = Step(lambda: mode_command(
        "export", f"checkpoint={out / 'demo-mode'}", "head=final", f"out={out / 'export-final'}",
    ), needs=("demo-mode",))  # fmt: skip
    steps |= {
        d.step: Step(lambda d=d: harness_step(out, out / d.where, d.step), needs=(d.made_by,))
        for d in DEPLOYED
    }
    return steps


def in_order(record_steps: dict[str, dict]) -> dict[str, dict]:
    """A record's steps in the order the study runs them, then any the study no longer has: the
    record has them in the order they first ran, which a continued study can change (a step
    that waited for a failed one runs after later steps)."""
    order = list(study_steps(OUT))
    return {
        name: record_steps[name]
        for name in sorted(record_steps, key=lambda n: order.index(n) if n in order else len(order))
    }


def partial_runs(folder: Path) -> list[Path]:
    """Run folders under `folder` a stop left with nothing to continue from: a run started, no
    checkpoint written yet."""
    candidates = [folder] if (folder / "config.yaml").is_file() else []
    candidates += [p for p in folder.glob("*/") if (p / "config.yaml").is_file()]
    return [p for p in candidates if not complete_checkpoints(p)]


def run_study(out: Path, *, continued: bool = False) -> dict:
    """Every run of the study into `out`: from scratch, or (`continued`) going on from where a
    stopped study left off: finished steps are kept, sweeps and the curve resume from their runs'
    checkpoints (runs with none start again), any other unfinished step starts again from
    nothing. A step whose `needs` did not finish is left for a later `--continue`. What ran, for
    how long."""
    if not continued and out.exists():
        shutil.rmtree(out)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with StudyRecord(out, continued=continued) as record:
        for name, step in study_steps(out).items():
            earlier = record.data["steps"].get(name)
            if earlier is not None and earlier["exit"] == 0:
                continue
            missing = [n for n in step.needs if record.data["steps"].get(n, {}).get("exit") != 0]
            if missing:
                print(f"{name}: not run, {', '.join(missing)} did not finish", flush=True)
                continue
            resumed = []
            if (out / name).exists():
                if step.resumes:
                    for partial in partial_runs(out / name):
                        print(f"{partial}: stopped before its first checkpoint, starts again")
                        shutil.rmtree(partial)
                    resumed = ["resume=auto"]
                else:
                    shutil.rmtree(out / name)  # what a stop left of it: the step starts again
            command = step.command()
            record.step_started(name, shown(command))
            result = run_step(name, command + resumed, logs, shown_as=command)
            record.step_done(name, result)
    return record.data


# ---------------------------------------------------------------------------- reading


def run_dir(out: Path, method: Method, seed: int) -> Path:
    """The folder of one run: `<out>/<sweep>/<index>-loss-<loss>_train.seed-<seed>`."""
    suffix = f"-loss-{method.loss}_train.seed-{seed}"
    found = [p for p in (out / method.sweep).glob(f"*{suffix}") if p.is_dir()]
    if len(found) != 1:
        raise FileNotFoundError(f"no single run folder *{suffix} in {out / method.sweep}")
    return found[0]


def trainable_parameters(run: Path) -> dict[str, int]:
    """The trained weights a run saved, counted: the adapter's and the MoDE head's."""
    counts = {}
    for name, path in (
        ("adapter", run / "adapter" / "adapter_model.safetensors"),
        ("head", run / "mode_head.safetensors"),
    ):
        total = 0
        if path.is_file():
            with safe_open(str(path), "pt") as weights:
                for key in weights.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    total += math.prod(weights.get_slice(key).get_shape())
        counts[name] = total
    return counts


def seconds_per_step(run: Path) -> float | None:
    """Training seconds per optimizer step, from the logged elapsed time after the first step
    (which also pays one-time costs)."""
    steps = train_records(run)
    if len(steps) < 2:
        return None
    first, last = steps[0], steps[-1]
    return (last["elapsed_s"] - first["elapsed_s"]) / (last["step"] - first["step"])


def read_run(run: Path) -> dict | None:
    """What the study reads of one run: losses, answers, parameters, speed and its report."""
    path = latest_report(run)
    if path is None:
        return None
    report = json.loads(path.read_text())
    losses = eval_losses(report)
    steps = train_records(run)
    return {
        "train_loss": steps[-1]["loss"] if steps else None,
        "eval_final": losses["final"],
        "eval_ensemble": losses["ensemble"],
        "em": exact_match(report),
        "examples": (report.get("answers") or {}).get("examples"),
        "params": trainable_parameters(run),
        "s_per_step": seconds_per_step(run),
        "report": report,
    }


def read_study(out: Path) -> dict:
    """Every run's results, the base's report, the curve run's records and the study record."""
    runs = {}
    for method in METHODS:
        for seed in SEEDS:
            try:
                runs[(method.name, seed)] = read_run(run_dir(out, method, seed))
            except FileNotFoundError:
                runs[(method.name, seed)] = None
    base = latest_report(out / "base")
    curve_log = out / "curve" / METRICS_FILE
    curve = [json.loads(line) for line in curve_log.read_text().splitlines()]
    return {
        "runs": runs,
        "base": json.loads(base.read_text()) if base else None,
        "curve": curve,
        "record": json.loads((out / "study.json").read_text()),
        "others": other_budgets(FIGURES),
        "deployed": read_deployed(out),
    }


def harness_scores(folder: Path) -> dict | None:
    """The bundled tasks' scores in the newest lm-evaluation-harness results file under `folder`
    (`--output_path`): per task, the items answered right and the items scored (the rate times
    the count: every item scores 0 or 1)."""
    found = sorted(folder.glob("**/results_*.json"), key=lambda p: p.name)
    if not found:
        return None
    results = json.loads(found[-1].read_text())
    scores = {}
    for task, metric, _ in HARNESS_SCORES:
        n = results["n-samples"][task]["effective"]
        scores[task] = {"correct": round(results["results"][task][metric] * n), "n": n}
    return scores


def read_deployed(out: Path) -> dict:
    """The demo-budget folders' lm-evaluation-harness scores by scoring step (None where it has
    not finished), and the demo runs' step count."""
    steps = {name: train_records(out / name) for name in DEMO_RUNS}
    return {
        "scores": {d.step: harness_scores(out / d.step) for d in DEPLOYED},
        "steps": {name: found[-1]["step"] for name, found in steps.items() if found},
    }


KEPT = ("train_loss", "eval_final", "eval_ensemble", "em", "s_per_step")


def kept_runs(data: dict) -> dict:
    """Every finished run's numbers, small enough to keep beside the page
    (`docs/study/runs-<steps>.json`): a study at another budget compares against them. The
    demo-budget folders' lm-evaluation-harness scores go with them (`deployed`), by scoring step,
    with the demo runs' step count."""
    return {
        "steps": STEPS,
        "runs": [
            {"method": name, "seed": seed} | {key: run.get(key) for key in KEPT}
            for (name, seed), run in data["runs"].items()
            if run is not None
        ],
        "deployed": data.get("deployed"),
    }


def other_budgets(folder: Path) -> dict[int, dict]:
    """The kept runs of the studies at budgets other than this one's, by step count, each shaped
    like `read_study`'s runs."""
    kept = [json.loads(path.read_text()) for path in sorted(folder.glob("runs-*.json"))]
    return {k["steps"]: kept_data(k) for k in kept if k["steps"] != STEPS}


def kept_data(kept: dict) -> dict:
    """`kept_runs`' record shaped like `read_study`'s runs: every method and seed, None where no
    run finished."""
    runs: dict = {(m.name, seed): None for m in METHODS for seed in SEEDS}
    runs.update({(run["method"], run["seed"]): run for run in kept["runs"]})
    return {"runs": runs}


# ---------------------------------------------------------------------------- numbers


def values(
    data: dict, method: Method, key: str | Callable[[dict], float | None]
) -> dict[int, float]:
    """One number per seed of a method: a key of `read_run`, or `eval_decode` / `em_decode` (the
    method's own decoding head), `em_final` / `em_ensemble`, or what `key` reads of a run."""
    found = {}
    for seed in SEEDS:
        run = data["runs"][(method.name, seed)]
        if run is None:
            continue
        if callable(key):
            value = key(run)
        elif key == "eval_decode":
            value = run[f"eval_{method.head}"]
        elif key.startswith("em_"):
            head = method.head if key == "em_decode" else key.removeprefix("em_")
            value = run["em"].get(head)
        else:
            value = run[key]
        if value is not None:
            found[seed] = value
    return found


def spread(found: dict[int, float], digits: int, scale: float = 1.0) -> str:
    """`mean ± std` over seeds (std: sample, n - 1)."""
    if not found:
        return "-"
    mean, std = mean_std([v * scale for v in found.values()])
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def layer_row(run: dict, layer: int) -> dict:
    """A run's report row of one layer."""
    return next(row for row in run["report"]["layers"] if row["layer"] == layer)


def router_table(data: dict) -> list[str]:
    """Per routed method, each selected layer's router weight (the tuned router's mean over
    tokens) and eval loss (through its trained norm): mean ± std over the seeds' reports."""
    routed = [m for m in METHODS if m.routed]
    first = next(
        (run["report"] for m in routed for seed in SEEDS if (run := data["runs"][(m.name, seed)])),
        None,
    )
    if first is None:
        return []
    selected, final = first["selected_layers"], first["num_layers"]

    def router(layer: int) -> Callable[[dict], float]:
        return lambda run: layer_row(run, layer)["router_weight"]["mean"]

    def loss(layer: int) -> Callable[[dict], float]:
        return lambda run: layer_row(run, layer)["tuned"]["loss"]

    rows = [
        [
            method.name,
            *(spread(values(data, method, router(layer)), 2) for layer in selected),
            *(spread(values(data, method, loss(layer)), 4) for layer in selected),
        ]
        for method in routed
    ]
    names = [f"layer {layer}" + (" (final)" if layer == final else "") for layer in selected]
    header = [
        "method",
        *(f"router weight, {n}" for n in names),
        *(f"eval loss, {n}" for n in names),
    ]
    return table(header, rows)


def paired(data: dict, first: Method, second: Method, key: str) -> dict | None:
    """first - second, paired by seed, with its 95% t-interval."""
    a, b = values(data, first, key), values(data, second, key)
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return None
    result = t_interval([a[s] - b[s] for s in seeds])
    return {"n": result.n, "mean": result.mean, "low": result.low, "high": result.high,
            "excludes_zero": result.excludes_zero, "p": result.p_value}  # fmt: skip


COMPARISONS = (
    # (first, second, why)
    *((m, BASELINE) for m in METHODS[1:]),
    (METHODS[4], METHODS[3]),
)
COMPARED = (
    ("eval_decode", "eval loss, decoding head", 4, 1.0),
    ("em_decode", "exact match, decoding head (points)", 1, 100.0),
    ("eval_final", "eval loss, final layer", 4, 1.0),
    ("em_final", "exact match, final layer (points)", 1, 100.0),
)


def judged(diff: dict, key: str) -> str:
    """`better`, `worse` or `no difference told apart`: where a paired interval lies."""
    lower_is_better = key.startswith("eval")
    better = (diff["high"] < 0) if lower_is_better else (diff["low"] > 0)
    worse = (diff["low"] > 0) if lower_is_better else (diff["high"] < 0)
    return "better" if better else "worse" if worse else "no difference told apart"


def verdict(data: dict) -> list[str]:
    """Plain words from the paired intervals: better, worse, or not told apart from seed noise."""
    lines = []
    for first, second in COMPARISONS:
        parts = []
        for key, label, digits, scale in COMPARED[:2]:
            diff = paired(data, first, second, key)
            if diff is None:
                parts.append(f"{label}: not enough finished seeds")
                continue
            parts.append(
                f"{label} {judged(diff, key)} ({diff['mean'] * scale:+.{digits}f}, 95% interval "
                f"[{diff['low'] * scale:+.{digits}f}, {diff['high'] * scale:+.{digits}f}])"
            )
        lines.append(f"- **{first.name}** against **{second.name}**: " + "; ".join(parts) + ".")
    return lines


def mode_measures(data: dict) -> list[tuple]:
    """The measures the verdict counts: each comparison of a routed method with one that is not,
    on the eval loss and exact match of the decoding heads, where enough seeds finished."""
    found = []
    for first, second in COMPARISONS:
        if not first.routed or second.routed:
            continue
        for key, label, _, _ in COMPARED[:2]:
            diff = paired(data, first, second, key)
            if diff is not None:
                found.append((first, second, key, label, diff))
    return found


ALPHA = 0.05  # the family-wise error the headline allows over all the measures it counts


@dataclass(frozen=True)
class Measure:
    """One measure the headline counts, with its Holm-adjusted p-value and the call it makes."""

    first: Method
    second: Method
    key: str
    label: str
    diff: dict
    holm_p: float

    @property
    def kind(self) -> str:
        """`eval loss` or `exact match`."""
        return self.label.split(",")[0]

    @property
    def call(self) -> str:
        """`better`, `worse` or `no difference told apart`, after the correction."""
        if self.holm_p >= ALPHA:
            return "no difference told apart"
        lower_is_better = self.key.startswith("eval")
        return "better" if (self.diff["mean"] < 0) == lower_is_better else "worse"

    @property
    def name(self) -> str:
        return f"{self.first.name} against {self.second.name} on {self.kind}"


def corrected(data: dict) -> list[Measure]:
    """The verdict's measures with Holm-adjusted p-values over all of them (`stats.holm`)."""
    measures = mode_measures(data)
    adjusted = holm([diff["p"] for *_, diff in measures])
    return [Measure(*measure, p) for measure, p in zip(measures, adjusted, strict=True)]


def seeds_word(n: int) -> str:
    return {2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}.get(n, str(n))


def summary(data: dict) -> str:
    """The verdict in one sentence, from Holm-adjusted p-values over every measure it counts
    (each comparison of a routed method with one that is not, on the eval loss and exact match
    of the head each decodes with): a measure is called better or worse only when its adjusted
    p-value is below ALPHA, so the chance of any false call among them is at most ALPHA. When
    the calls differ by measure, both directions are said."""
    measures = corrected(data)
    if not measures:
        return "Not enough finished seeds to compare MoDE with its baselines."
    count = len(measures)
    seeds = seeds_word(min(m.diff["n"] for m in measures))
    over = f"with a Holm correction over the {count} measures"
    calls = {"better": [], "worse": []}
    for measure in measures:
        if measure.call in calls:
            calls[measure.call].append(measure)
    better, worse = calls["better"], calls["worse"]
    rest = count - len(better) - len(worse)
    rest_words = f"; the other {rest} were not told apart" if rest else ""

    def kinds(found: list[Measure]) -> str:
        return " and ".join(dict.fromkeys(m.kind for m in found))

    def named(found: list[Measure]) -> str:
        return "; ".join(f"{m.name}, adjusted p {m.holm_p:.3f}" for m in found)

    if better and worse:
        return (
            f"Mixed, {over}: MoDE was better on {kinds(better)} ({named(better)}) and worse on "
            f"{kinds(worse)} ({named(worse)}){rest_words}."
        )
    if better:
        return (
            f"MoDE helped here, {over}: better on {kinds(better)} ({named(better)}), worse on "
            f"none{rest_words}."
        )
    if worse:
        return (
            f"MoDE did not help here, {over}: worse on {kinds(worse)} ({named(worse)}), better "
            f"on none{rest_words}."
        )
    smallest = min(m.holm_p for m in measures)
    return (
        f"MoDE made no difference {seeds} seeds can tell apart: {over}, none differs from its "
        f"baseline (the smallest adjusted p-value is {smallest:.2f})."
    )


def correction(data: dict) -> str:
    """How the headline was derived, and what the unadjusted intervals said on their own."""
    measures = corrected(data)
    if not measures:
        return ""
    count = len(measures)
    seeds = seeds_word(min(m.diff["n"] for m in measures))
    alone = [m for m in measures if m.diff["excludes_zero"]]
    before = (
        f"Before the correction, {len(alone)} of the {count} unadjusted 95% intervals excluded 0 ("
        + "; ".join(f"{m.name}, p {m.diff['p']:.3f}" for m in alone)
        + ")"
        if alone
        else f"Before the correction, none of the {count} unadjusted 95% intervals excluded 0"
    )
    return (
        f"The headline counts {count} measures: each MoDE method against the method it adds to, "
        "on the eval loss and the exact match of the head each decodes with. Each measure's "
        "paired t-test p-value (the test its 95% interval inverts) is adjusted by Holm's "
        f"step-down method over all {count}, and a measure is called better or worse only when "
        f"its adjusted p-value is below {ALPHA}: the chance of any false call among them is then "
        f"at most {ALPHA:.0%}, where {count} separate 95% intervals would make at least one "
        f"in {1 - (1 - ALPHA) ** count:.0%} of studies with no real difference anywhere (were "
        f"they independent). {before}; the tables keep the unadjusted intervals. "
        f'"No difference told apart" means {seeds} seeds cannot separate the methods from '
        "run-to-run noise, not that they are equal."
    )


def correction_table(data: dict) -> list[str]:
    """The headline's measures: difference, unadjusted interval and p, Holm-adjusted p, call."""
    rows = []
    for m in corrected(data):
        digits, scale = next((d, s) for k, _, d, s in COMPARED if k == m.key)
        diff = m.diff
        rows.append(
            [
                f"{m.first.name} - {m.second.name}",
                m.label,
                f"{diff['mean'] * scale:+.{digits}f}",
                f"[{diff['low'] * scale:+.{digits}f}, {diff['high'] * scale:+.{digits}f}]",
                f"{diff['p']:.3f}",
                f"{m.holm_p:.3f}",
                m.call,
            ]
        )
    if not rows:
        return []
    header = ["comparison", "metric", "difference", "95% interval (unadjusted)", "p",
              "Holm-adjusted p", "after the correction"]  # fmt: skip
    return table(header, rows)


def budgets_table(data: dict) -> list[str]:
    """The baseline and the paired differences of the decoding heads at each budget: this
    study's and the kept ones of `data["others"]`."""
    budgets = {**data.get("others", {}), STEPS: data}
    order = sorted(budgets)

    def difference(found: dict, first: Method, second: Method, compared: tuple) -> str:
        key, _, digits, scale = compared
        diff = paired(found, first, second, key)
        if diff is None:
            return "-"
        return (
            f"{diff['mean'] * scale:+.{digits}f} [{diff['low'] * scale:+.{digits}f}, "
            f"{diff['high'] * scale:+.{digits}f}]" + (" *" if diff["excludes_zero"] else "")
        )

    rows = [
        [BASELINE.name, "eval loss (mean ± std)",
         *(spread(values(budgets[s], BASELINE, "eval_final"), 4) for s in order)],
        [BASELINE.name, "exact match % (mean ± std)",
         *(spread(values(budgets[s], BASELINE, "em_final"), 1, 100) for s in order)],
    ]  # fmt: skip
    for first, second in COMPARISONS:
        for compared in COMPARED[:2]:
            rows.append(
                [f"{first.name} - {second.name}", compared[1],
                 *(difference(budgets[s], first, second, compared) for s in order)]
            )  # fmt: skip
    return table(["method or comparison", "metric", *(f"{s} steps" for s in order)], rows)


def deployed_intervals(data: dict) -> dict[str, dict[str, tuple[float, float, float]]] | None:
    """Each deployed folder's rate on each bundled task with its 95% Wilson interval, by scoring
    step and task: (rate, low, high); None unless every folder was scored."""
    scores = data.get("deployed", {}).get("scores", {})
    if any(scores.get(d.step) is None for d in DEPLOYED):
        return None
    found = {}
    for d in DEPLOYED:
        found[d.step] = {}
        for task, _, _ in HARNESS_SCORES:
            score = scores[d.step][task]
            low, high = wilson_interval(score["correct"], score["n"])
            found[d.step][task] = (score["correct"] / score["n"], low, high)
    return found


def deployed_table(data: dict) -> list[str]:
    """What a user who deploys each folder gets: the bundled tasks' scores under
    lm-evaluation-harness with 95% Wilson intervals."""
    scores = data.get("deployed", {}).get("scores", {})
    rows = []
    for d in DEPLOYED:
        cells = []
        for task, _, _ in HARNESS_SCORES:
            score = (scores.get(d.step) or {}).get(task)
            if score is None:
                cells.append("-")
                continue
            low, high = wilson_interval(score["correct"], score["n"])
            rate = score["correct"] / score["n"]
            cells.append(f"{100 * rate:.1f}% [{100 * low:.1f}, {100 * high:.1f}]")
        loads = "`trust_remote_code=True`" if d.ensemble else "plain transformers"
        rows.append([d.label, f"`outputs/study/{d.where}`", loads, *cells])
    header = [
        "folder",
        "path",
        "loads as",
        *(f"{name} (95% interval)" for *_, name in HARNESS_SCORES),
    ]
    return table(header, rows)


def deployment(data: dict) -> str:
    """Which folder to deploy per the lm-evaluation-harness scores, in one sentence: first of the
    `mode` run's two exports (the ensemble only where its 95% interval lies above the final
    layer's and below it on no task: it alone needs custom code), then that folder against
    `final-only`'s. One interval "lies above" another when its low end is above the other's high
    end; otherwise the two are not told apart."""
    intervals = deployed_intervals(data)
    if intervals is None:
        return "Not every folder was scored: which one to deploy is not judged."
    names = {task: name for task, _, name in HARNESS_SCORES}
    baseline, ensemble, final = DEPLOYED

    def above(a: Deployed, b: Deployed) -> str:
        """The tasks on which a's interval lies wholly above b's, in words ('' for none)."""
        low, high = 1, 2
        return " and ".join(
            names[t] for t in names if intervals[a.step][t][low] > intervals[b.step][t][high]
        )

    def relation(a: Deployed, b: Deployed, *, named: bool) -> str:
        """How a's interval lies against b's (`named`: saying b)."""
        up, down = above(a, b), above(b, a)
        that = f" that of {b.called}" if named else ""
        if up and down:
            return f"lies above{that} on {up} and below on {down}"
        if up or down:
            return f"lies {'above' if up else 'below'}{that} on {up or down}"
        return f"overlaps{that} on both tasks"

    up, down = above(ensemble, final), above(final, ensemble)
    if up and down:
        decision, chosen = "the `mode` run's two exports split by task", [ensemble, final]
    elif up:
        decision = "deploy the `mode` run's `merged/`, the ensemble export (`trust_remote_code`)"
        chosen = [ensemble]
    elif down:
        decision, chosen = "deploy the `mode` run's `head=final` export, not its `merged/`", [final]
    else:
        decision = (
            "the `mode` run's `head=final` export, a plain model, serves as well as its `merged/` "
            "ensemble, which needs `trust_remote_code`"
        )
        chosen = [final]
    against = " and ".join(
        f"{m.called}'s interval {relation(m, baseline, named=False)}" for m in chosen
    )
    if all(above(baseline, m) and not above(m, baseline) for m in chosen):
        verdict = f"so {baseline.called} is the better folder to deploy"
    elif all(above(m, baseline) and not above(baseline, m) for m in chosen):
        verdict = "so the `mode` run's folder is the better one to deploy"
    else:
        verdict = "so these figures do not prefer either run's folder"
    return (
        f"Per these figures, {decision}: {ensemble.called}'s 95% interval "
        f"{relation(ensemble, final, named=True)}; against {baseline.called}, {against}, "
        f"{verdict}."
    )


def deployed_time(record: dict) -> str:
    """The wall time of the demo-budget runs, the export and the scorings, and of each."""
    names = [*DEMO_RUNS, "export-final", *(d.step for d in DEPLOYED)]
    found = {n: record["steps"][n] for n in names if n in record["steps"]}
    if not found:
        return "These steps have not run."
    total = sum(step["seconds"] for step in found.values())
    each = ", ".join(
        f"{name} {duration(step['seconds'])}" + ("" if step["exit"] == 0 else " (not finished)")
        for name, step in found.items()
    )
    return (
        f"These runs, the export and the scorings took {duration(total)} of the wall time ({each})."
    )


# ---------------------------------------------------------------------------- figures


def curve_figure(data: dict) -> Figure:
    """The baseline's eval loss (and train loss) by step over 1.5 times the study's steps, and
    the baseline runs' final eval loss on the same rows."""
    records = data["curve"]
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval" in r]
    figure = Figure(figsize=(7.5, 4), layout="constrained")
    ax = figure.subplots()
    ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], color="tab:gray",
            linewidth=0.8, alpha=0.6, label="train loss (per step)")  # fmt: skip
    ax.plot([r["step"] for r in evals], [r["eval"]["final"] for r in evals], marker="o",
            color="tab:blue", label=f"eval loss ({CURVE_EXAMPLES} eval rows)")  # fmt: skip
    end = f"the study's runs end: {STEPS}" + (
        " (one pass over the train rows)" if STEPS * BATCH == TRAIN_ROWS else ""
    )
    ax.axvline(STEPS, color="tab:orange", linestyle="--", label=end)
    finals = list(values(data, BASELINE, "eval_final").values())
    if finals:
        mean, std = mean_std(finals)
        ax.errorbar([STEPS], [mean], yerr=[std or 0.0], fmt="s", color="tab:red", capsize=4,
                    label=f"final-only runs of {STEPS} steps (mean ± std of {len(finals)} seeds)")  # fmt: skip
    ax.set_xlabel(f"optimizer step ({BATCH} examples each)")
    ax.set_ylabel("loss (nats / token)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"final-only, seed 0, cosine schedule over {CURVE_STEPS} steps", fontsize="medium")
    return figure


def layers_figure(data: dict) -> Figure:
    """Eval loss and top-1 by depth: the base, and each method after tuning (seed 0)."""
    figure = Figure(figsize=(8, 6.5), layout="constrained")
    axes = figure.subplots(2, 1, sharex=True)
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]
    base = data["base"]
    for ax, key, label in zip(
        axes, ("loss", "top1"), ("loss (nats / token)", "top-1"), strict=True
    ):
        if base is not None:
            layers = [row["layer"] for row in base["layers"]]
            ax.plot(layers, [row["base"][key] for row in base["layers"]], color="black",
                    marker=".", label="base (before tuning)")  # fmt: skip
        for method, colour, marker in zip(METHODS, colours, "os^Dv", strict=True):
            run = data["runs"][(method.name, SEEDS[0])]
            if run is None:
                continue
            rows = run["report"]["layers"]
            # DoRA dashed over LoRA solid: a DoRA method's curve lies close to its LoRA twin's.
            ax.plot([r["layer"] for r in rows], [r["tuned"][key] for r in rows], color=colour,
                    marker=marker, markersize=3, linewidth=1,
                    linestyle="--" if method.sweep == "dora" else "-", label=method.name)  # fmt: skip
            ensemble = run["report"]["ensemble"]
            if ensemble:
                ax.scatter([len(rows) + 0.6], [ensemble["tuned"][key]], color=colour, marker="*",
                           s=60)  # fmt: skip
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if key == "loss":
            ax.set_yscale("log")
    axes[0].legend(fontsize="small")
    axes[1].set_xlabel("layer (logit lens; stars right of layer 30: the ensemble)")
    figure.suptitle(
        f"Per-layer eval on {LAYER_ROWS} eval rows, seed 0 of each method", fontsize="medium"
    )
    return figure


def seeds_figure(data: dict) -> Figure:
    """The main numbers per method, one dot per seed."""
    panels = (
        ("eval_decode", "eval loss, decoding head", 1.0),
        ("em_decode", "exact match %, decoding head", 100.0),
        ("em_final", "exact match %, final layer", 100.0),
    )
    figure = Figure(figsize=(11, 3.8), layout="constrained")
    axes = figure.subplots(1, len(panels))
    for ax, (key, title, scale) in zip(axes, panels, strict=True):
        for x, method in enumerate(METHODS):
            found = values(data, method, key)
            ax.scatter(
                [x] * len(found), [v * scale for v in found.values()], color="tab:blue", s=20
            )
            if found:
                mean = sum(found.values()) / len(found) * scale
                ax.hlines(mean, x - 0.25, x + 0.25, color="tab:orange", linewidth=2)
        ax.set_title(title, fontsize="medium")
        ax.set_xticks(range(len(METHODS)))
        ax.set_xticklabels([m.name for m in METHODS], rotation=25, ha="right", fontsize="small")
        ax.grid(axis="y", alpha=0.3)
    figure.suptitle("one dot per seed, the mean as a bar", fontsize="medium")
    return figure


# ---------------------------------------------------------------------------- the document


def duration(seconds: float) -> str:
    if seconds < 30:
        return "under 1 min"
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def epochs(steps: int) -> str:
    """How much of the train split `steps` optimizer steps read."""
    passes = steps * BATCH / TRAIN_ROWS
    if passes == 1:
        return "one pass over the train rows"
    return f"{passes:.0%} of an epoch" if passes < 1 else f"{passes:.2g} epochs"


def curve_evals(data: dict) -> dict[int, float]:
    """The curve run's final-layer eval loss by step."""
    return {r["step"]: r["eval"]["final"] for r in data["curve"] if "eval" in r}


def flatness(data: dict) -> str:
    """Whether the baseline's eval loss had flattened at the study's budget, in words: the
    longer run's end against the baseline runs' seed scatter, and the longer run's last fifth."""
    at = curve_evals(data)
    finals = list(values(data, BASELINE, "eval_final").values())
    if not finals or CURVE_STEPS not in at:
        return "The curve or the baseline runs are missing: flatness is not judged."
    mean, std = mean_std(finals)
    end = at[CURVE_STEPS]
    gain = (mean - end) / mean
    if gain > 0:
        change = f"lower the baseline's eval loss by {gain:.1%}"
        change += f" ({(mean - end) / std:.1f} seed standard deviations)" if std else ""
    else:
        change = f"do not lower the baseline's eval loss (it ends {-gain:.1%} higher)"
    scatter = f" ± {std:.4f}" if std else ""
    words = [
        f"On the same rows, the {STEPS}-step baseline runs ({len(finals)} seeds) end at "
        f"{mean:.4f}{scatter}; the {CURVE_STEPS}-step run ends at {end:.4f}: 50% more steps "
        f"{change}."
    ]
    late = max((s for s in at if s <= CURVE_STEPS * 4 // 5), default=None)
    drift = None if late is None else (at[late] - end) / at[late]
    if drift is not None and abs(drift) < FLAT:
        words.append(
            f"The longer run itself flattens: from step {late} to {CURVE_STEPS} its eval loss "
            f"moved {drift:.1%}."
        )
    if std and mean - end > std:
        others = sorted(data.get("others", {}))
        moved = (
            f"the same gaps at {' and '.join(map(str, others))} steps are in At other budgets "
            "below; where they stand at the floor is not measured here."
            if others
            else "whether the gaps between methods change with a longer budget is not measured "
            "here."
        )
        words.append(
            f"So the baseline had not flattened at the study's {STEPS} steps: more training still "
            f"lowers its eval loss by more than the seeds scatter. The comparisons above are made "
            f"at {STEPS} steps, short of the baseline's floor; {moved}"
        )
    else:
        words.append(
            f"At {STEPS} steps the baseline is within its seed scatter of where longer training "
            "takes it."
        )
    if STEPS * BATCH == TRAIN_ROWS:
        words.append(
            "The study's budget is one pass over the train rows; past it the longer run reads "
            "them again, so a longer budget would compare the methods on rows they have already "
            "trained on."
        )
    return " ".join(words)


def parts(record: dict) -> str:
    """How long each step of the study took, and the wall time no step's record holds (a stop
    that came before the record timed its running step)."""
    words = [
        f"{name} {duration(step['seconds'])}" + ("" if step["exit"] == 0 else " (not finished)")
        for name, step in in_order(record["steps"]).items()
    ]
    text = "Its parts took: " + ", ".join(words) + "."
    untimed = record["wall_s"] - sum(step["seconds"] for step in record["steps"].values())
    if untimed > UNTIMED:
        text += (
            f" {duration(untimed)} of the wall time is in no part: sittings a stop cut short "
            "without their step's time being recorded."
        )
    stopped: dict[str | None, float] = {}
    for pause in record.get("suspended", []):
        stopped[pause["step"]] = stopped.get(pause["step"], 0.0) + pause["seconds"]
    if stopped:
        where = " and ".join(
            f"{duration(seconds)} " + (f"during {name}" if name else "between the steps")
            for name, seconds in stopped.items()
        )
        text += (
            f" The study stood stopped (its processes suspended, no run working) for {where}; "
            "the times above include it."
        )
    return text


def deployed_section(data: dict) -> list[str]:
    """What a user who deploys each folder gets: the demo-budget runs' folders scored by
    lm-evaluation-harness, which to deploy per those scores, and what the steps took."""
    steps = data.get("deployed", {}).get("steps", {})
    budget = sorted(set(steps.values()))
    budget_words = " and ".join(map(str, budget)) + " steps" if budget else "its own step count"
    tasks = " and ".join(f"`{task}`" for task, _, _ in HARNESS_SCORES)
    return [
        "## Where users run it",
        "",
        f"What a user who deploys each folder gets. At the demo's budget (`make demo`'s recipe "
        f"`{RECIPE}` as shipped, {budget_words}, seed {DEMO_SEED}), one `mode` run and one "
        "`final-only` run each wrote the folder `mode train` leaves to deploy, `merged/`: the "
        "MoDE ensemble export for `mode`, the plain model for `final-only`. `mode export ... "
        "head=final` wrote the `mode` run's final layer alone, a plain transformers model. "
        f"lm-evaluation-harness (`--model hf`) scored each folder on `mode`'s bundled tasks, "
        f"{tasks}, every item: multiple choice by log-likelihood over four answers, and exact "
        "match of greedy answers (the last commands above). 95% Wilson intervals over the "
        f"items. One run of each method, at {budget_words} against the table's {STEPS}: what "
        "`make demo` hands a user, not a comparison of the methods (the seeds above are that).",
        "",
        *deployed_table(data),
        "",
        deployment(data),
        "",
        deployed_time(data["record"]),
        "",
    ]


def markdown(data: dict) -> str:
    record = data["record"]
    steps = record["steps"]
    load = record.get("load_mean")
    rows = []
    for method in METHODS:
        params = [data["runs"][(method.name, s)] for s in SEEDS]
        counts = next((r["params"] for r in params if r is not None), None)
        trainable = f"{counts['adapter'] + counts['head']:,}" if counts else "-"
        if counts and counts["head"]:
            trainable += f" ({counts['head']:,} head)"
        rows.append(
            [
                f"**{method.name}**",
                str(len(values(data, method, "train_loss"))),
                trainable,
                spread(values(data, method, "s_per_step"), 2),
                spread(values(data, method, "train_loss"), 3),
                spread(values(data, method, "eval_final"), 4),
                spread(values(data, method, "eval_ensemble"), 4),
                spread(values(data, method, "em_final"), 1, 100),
                spread(values(data, method, "em_ensemble"), 1, 100),
            ]
        )
    main = table(
        ["method", "seeds", "trainable parameters", "s / step", "train loss", "eval loss final",
         "eval loss ensemble", "EM final %", "EM ensemble %"],
        rows,
    )  # fmt: skip
    diff_rows = []
    for first, second in COMPARISONS:
        for key, label, digits, scale in COMPARED:
            diff = paired(data, first, second, key)
            if diff is None:
                continue
            diff_rows.append(
                [
                    f"{first.name} - {second.name}",
                    label,
                    str(diff["n"]),
                    f"{diff['mean'] * scale:+.{digits}f}",
                    f"[{diff['low'] * scale:+.{digits}f}, {diff['high'] * scale:+.{digits}f}]",
                    "yes *" if diff["excludes_zero"] else "no",
                ]
            )
    diffs = table(["comparison", "metric", "seeds", "difference", "95% interval", "excludes 0"],
                  diff_rows)  # fmt: skip
    base = data["base"]
    base_em = base_loss = "-"
    if base is not None:
        base_loss = f"{base['layers'][-1]['base']['loss']:.4f}"
        score = (base.get("answers") or {}).get("base", {}).get("final")
        if score:
            low, high = score["interval"]
            base_em = f"{100 * score['accuracy']:.1f}% [{100 * low:.1f}, {100 * high:.1f}]"
    at = curve_evals(data)
    curve_line = ", ".join(
        f"step {s}: {at[s]:.4f}"
        for s in sorted(at)
        if s % (2 * CURVE_EVERY) == 0 or s in (STEPS, CURVE_STEPS)
    )
    lines = [
        "# Does MoDE help on the default model? A seed-paired study",
        "",
        "Generated by `make study` (`python scripts/study.py`; `--render-only` rewrites this page "
        "from `outputs/study/`). Do not edit by hand.",
        "",
        f"**Wall time: {duration(record['wall_s'])}** on {record['cpus']} CPU cores "
        f"(started {record['started']}"
        + (
            f"; in {record['invocations']} sittings, `--continue` resuming the runs, time lost to "
            "the interruptions included"
            if record.get("invocations", 1) > 1
            else ""
        )
        + (
            f"; the machine's 1-minute load averaged {load:.1f}"
            + (
                ", other jobs shared it"
                if load > THREADS + 0.5
                else f", the study's {THREADS} threads"
            )
            if load
            else ""
        )
        + ").",
        "",
        "## Setup",
        "",
        f"- Model: SmolLM2-135M-Instruct in NF4 (`package:smollm2`, 30 layers), recipe "
        f"`{RECIPE}`: LoRA or DoRA r16 (alpha 32, no dropout) on every linear layer, MoDE over "
        "layers 28-30 with a token router.",
        f"- Data: the bundled arithmetic word problems, {TRAIN_ROWS:,} train rows; exact match "
        f"on all {EVAL_ROWS} eval rows (greedy answers, up to {MAX_NEW_TOKENS} new tokens, the "
        f'number after "The answer is"), the per-layer eval losses on the first {LAYER_ROWS}.',
        f"- Training: {STEPS} optimizer steps of {BATCH} examples ({STEPS * BATCH:,} examples, "
        f"{epochs(STEPS)}), AdamW lr 1e-3, 10 warmup steps then cosine, "
        f"fp32 compute, {THREADS} threads. Seeds {', '.join(map(str, SEEDS))} (the seed sets the "
        "adapter's initialisation and the data order).",
        "- Methods: `final-only` (the baseline: plain QLoRA), `mode` (ensemble cross-entropy + "
        "distillation, weight 0.1), `mode-nodistill`, `dora` (DoRA, final-only), `dora + mode`. "
        "A MoDE run decodes with its ensemble; the others with the final layer.",
        "",
        "The commands `make study` ran:",
        "",
        "```bash",
        *(step["command"] for step in in_order(steps).values()),
        "```",
        "",
        "## Results",
        "",
        "Mean ± standard deviation over the seeds (sample, n - 1). Eval losses in nats per "
        f"response token on {LAYER_ROWS} eval rows; EM: exact-match accuracy of greedy answers "
        f"on all {EVAL_ROWS}. s / step: training seconds per optimizer step (from the runs' own "
        "logs; other jobs on the machine slow some runs more than others).",
        "",
        *main,
        "",
        f"The base before tuning (adapter off, the same for every method): final-layer eval loss "
        f"{base_loss}, exact match {base_em} (95% Wilson interval).",
        "",
        "![one dot per seed](study/seeds.png)",
        "",
        "### Paired differences",
        "",
        "The difference of two methods' runs with the same seed, averaged over the seeds, with a "
        "95% t-interval (t with n - 1 degrees of freedom). Negative is better for a loss, "
        "positive for exact match. `yes *`: the interval excludes 0.",
        "",
        *diffs,
        "",
        "## Verdict",
        "",
        f"**{summary(data)}**",
        "",
        correction(data),
        "",
        *correction_table(data),
        "",
        "Each comparison on its own, from the unadjusted 95% intervals of the table above:",
        "",
        *verdict(data),
        "",
        *deployed_section(data),
        "## Has the baseline flattened?",
        "",
        f"One more final-only run (seed 0) of {CURVE_STEPS} steps, 1.5 times the study's budget, "
        f"with its own cosine schedule, logged its eval loss on the {CURVE_EXAMPLES} eval rows the "
        f"reports read, every {CURVE_EVERY} steps: {curve_line}. {flatness(data)}",
        "",
        "![eval loss by step](study/curve.png)",
        "",
        *(
            [
                "## At other budgets",
                "",
                "The baseline and the paired differences of the decoding heads (mean [95% "
                "interval], `*` where it excludes 0) at every budget `make study` has been run "
                f"with: this page's {STEPS} steps, and the numbers kept from the runs at other "
                "step counts (`docs/study/runs-<steps>.json`, which each rendering writes). Each "
                "budget has its own cosine schedule, seeds and runs.",
                "",
                *budgets_table(data),
                "",
            ]
            if data.get("others")
            else []
        ),
        "## Where in the network",
        "",
        "Per-layer eval loss (logit lens) before tuning and after, seed 0 of each method; for a "
        "MoDE run the selected layers 28 and 29 are read through their trained norms, and the "
        "star is the ensemble.",
        "",
        "![per-layer loss and top-1](study/layers.png)",
        "",
        "What each MoDE method's router chose, over all its seeds: the tuned router's mean weight "
        "per token on each selected layer, and that layer's eval loss read through its trained "
        "norm (mean ± std over the seeds). A router that keeps nearly all its weight on the final "
        "layer makes the ensemble that layer.",
        "",
        *router_table(data),
        "",
        "## Reproducing",
        "",
        "`make study` reruns everything into `outputs/study/` (each sweep folder also has its own "
        "`sweep.md` with seed-paired comparisons) and rewrites this page, `docs/study/*.png` and "
        f"`docs/study/runs-{STEPS}.json`. " + parts(record),
    ]
    return "\n".join(lines) + "\n"


def render(out: Path) -> None:
    data = read_study(out)
    FIGURES.mkdir(parents=True, exist_ok=True)
    curve_figure(data).savefig(FIGURES / "curve.png", dpi=100)
    layers_figure(data).savefig(FIGURES / "layers.png", dpi=100)
    seeds_figure(data).savefig(FIGURES / "seeds.png", dpi=100)
    (FIGURES / f"runs-{STEPS}.json").write_text(json.dumps(kept_runs(data), indent=1) + "\n")
    DOC.write_text(markdown(data))
    print(f"wrote {DOC}, {FIGURES}/*.png and {FIGURES}/runs-{STEPS}.json", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help="where the runs go")
    parser.add_argument(
        "--render-only", action="store_true", help="rewrite the page from the runs in --out"
    )
    parser.add_argument(
        "--continue", dest="continued", action="store_true",
        help="go on with a stopped study in --out: finished steps kept, runs resumed",
    )  # fmt: skip
    args = parser.parse_args()
    if not args.render_only:
        # The scorings come last, hours in: a missing harness is said before anything runs.
        if importlib.util.find_spec("lm_eval") is None:
            print(
                "lm-evaluation-harness is not installed, and the study ends by scoring its "
                'exports with it: pip install "mode-cli[harness]" (or make setup)',
                file=sys.stderr,
            )
            return 2
        record = run_study(args.out, continued=args.continued)
        failed = [name for name, step in record["steps"].items() if step["exit"] != 0]
        if failed:
            print(f"failed: {', '.join(failed)} (see {args.out / 'logs'})", flush=True)
            return 1
    render(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
