"""Peak memory of `mode train` with the MoDE loss against plain QLoRA (`loss=final-only`).

Side by side, one run each, one after the other: the demo job (`recipe=smollm2-arithmetic`: SmolLM2
NF4, LoRA r16 all-linear, bundled arithmetic data) with gradient checkpointing and micro-batch 8,
the shape where the MoDE loss's share of memory is largest (a few hundred target tokens a step).
Each run is the real command, `mode train recipe=... loss=...`, in a process of its own. Figures
per run, each a peak of the process's resident memory:

- setup: loading the tokenizer, the data and the 4-bit base (the same for every loss);
- training: the training loop alone (the peak is reset through /proc/self/clear_refs when it
  starts, with the model already resident): what the loss changes;
- command: the whole command, the per-layer report included. No merged model: merging reloads
  the base the same way for every loss, whatever the loss did.

Each as peak RSS (VmHWM, what `ru_maxrss` reports) and as peak anonymous memory (RssAnon,
sampled every 2 ms by a thread). RSS also counts file-backed pages (the shared libraries' code,
mapped model files), which the kernel drops and faults back in as other processes need memory:
on a shared machine that moved the same command's peak RSS by over 100 MiB from run to run, as
much as the difference measured. Anonymous memory is what the process allocated.

    python scripts/bench_memory.py                 # 10 steps each; writes its section of docs/benchmarks.md
    python scripts/bench_memory.py --steps 4 --doc ''
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchdoc import DOC, cpu_model, run_worker, write_section  # noqa: E402

MIB = 2**20
LOSSES = ("final-only", "mode")
TARGET = 1.05  # MoDE's peak over plain QLoRA's on the same job
RECIPE = "smollm2-arithmetic"


def command(loss: str, steps: int, out: Path, extra: list[str], recipe: str = RECIPE) -> list[str]:
    """The `mode train` arguments of one run."""
    return [
        "train",
        f"recipe={recipe}",
        "train.gradient_checkpointing=true",
        "train.micro_batch_size=8",
        f"loss={loss}",
        f"train.max_steps={steps}",
        "merge=false",
        f"output_dir={out}",
        *extra,
    ]


def status(key: str) -> int:
    """A memory figure of this process from /proc/self/status (VmHWM: the peak since the last
    reset; VmRSS: now), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def reset_peak() -> None:
    """Start VmHWM again from the current RSS."""
    Path("/proc/self/clear_refs").write_text("5")


class AnonPeak:
    """The peak of RssAnon since the last `take()`, sampled every `interval` seconds by a thread
    (reading /proc releases the GIL's hold on nothing else: torch's kernels run without it)."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval, self.peak, self.running = interval, 0, True
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()

    def sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, status("RssAnon"))
            time.sleep(self.interval)

    def take(self) -> int:
        """The peak since the last call, and start again from now."""
        peak = max(self.peak, status("RssAnon"))
        self.peak = 0
        return peak

    def stop(self) -> None:
        self.running = False
        self.thread.join()


def worker(args: list[str]) -> dict:
    """Run `mode ARGS` in this process; the peaks of setup, of the training loop and overall."""
    from mode_cli.cli import main
    from mode_cli.train import recipe as recipe_mod

    peaks: dict = {}
    train = recipe_mod.FinetuneRecipe.train
    anon = AnonPeak()

    def measured_train(self):
        peaks["setup_bytes"] = status("VmHWM")
        peaks["setup_anon_bytes"] = anon.take()
        reset_peak()
        peaks["training_start_bytes"] = status("VmRSS")
        peaks["training_start_anon_bytes"] = status("RssAnon")
        finished = train(self)
        peaks["training_bytes"] = status("VmHWM")
        peaks["training_anon_bytes"] = anon.take()
        return finished

    recipe_mod.FinetuneRecipe.train = measured_train
    start = time.perf_counter()
    code = main(args)
    if code != 0:
        raise SystemExit(f"mode {' '.join(args)} exited {code}")
    anon.stop()
    peaks["command_bytes"] = max(peaks["setup_bytes"], peaks["training_bytes"], status("VmHWM"))
    peaks["command_anon_bytes"] = max(
        peaks["setup_anon_bytes"], peaks["training_anon_bytes"], anon.take()
    )
    peaks["seconds"] = time.perf_counter() - start
    out = Path(next(a for a in args if a.startswith("output_dir=")).split("=", 1)[1])
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in logged if "loss" in r]
    peaks["steps"] = len(steps)
    peaks["target_tokens_per_step"] = sum(r["target_tokens"] for r in steps) / len(steps)
    peaks["step_seconds"] = steps[-1]["elapsed_s"] / len(steps)
    return peaks


def run(loss: str, steps: int, extra: list[str], recipe: str = RECIPE) -> dict:
    """One run in its own process; its figures."""
    with tempfile.TemporaryDirectory() as tmp:
        args = command(loss, steps, Path(tmp) / "run", extra, recipe)
        record = run_worker(__file__, ["--worker", json.dumps(args)], f"loss={loss}")
    record["loss"] = loss
    print(
        f"loss={loss:11} peak RSS / anonymous MiB: setup {record['setup_bytes'] / MIB:.0f} / "
        f"{record['setup_anon_bytes'] / MIB:.0f}, training {record['training_bytes'] / MIB:.0f} / "
        f"{record['training_anon_bytes'] / MIB:.0f}, command {record['command_bytes'] / MIB:.0f}"
        f" / {record['command_anon_bytes'] / MIB:.0f}; {record['step_seconds']:.2f} s/step, "
        f"{record['target_tokens_per_step']:.0f} target tokens/step",
        file=sys.stderr,
    )
    return record


FIGURES = ("setup", "training", "command")


def ratios(records: dict[str, dict]) -> dict[str, float]:
    """MoDE over final-only: each peak, RSS and anonymous, and the step time."""
    mode, final = records["mode"], records["final-only"]
    out = {}
    for figure in FIGURES:
        for kind in ("", "_anon"):
            key = f"{figure}{kind}_bytes"
            out[f"{figure}{kind}"] = mode[key] / final[key]
    out["step_time"] = mode["step_seconds"] / final["step_seconds"]
    return out


def markdown(records: dict[str, dict], steps: int, extra: list[str], recipe: str = RECIPE) -> str:
    import torch

    r = ratios(records)
    args = command("<loss>", steps, Path("<tmp>"), extra, recipe)
    shown = " ".join(a for a in args if not a.startswith("output_dir="))
    lines = [
        "## Peak memory of `mode train`: MoDE against plain QLoRA",
        "",
        f"`mode {shown}` with `loss=final-only`, then `loss=mode`, each in its own process, one "
        "after the other (`scripts/bench_memory.py`). Peaks of setup (tokenizer, data, 4-bit "
        "base), of the training loop alone (reset when it starts, the model resident), and of "
        "the whole command (the per-layer report included; no merge); each as peak RSS (VmHWM) "
        "and as peak anonymous memory (RssAnon sampled every 2 ms: RSS also counts file-backed "
        "pages, which a shared machine's memory pressure adds and drops from run to run).",
        "",
        f"Machine: {cpu_model()}, {os.cpu_count()} cores; torch "
        f"{torch.__version__}. Other jobs shared the machine, so times are noisy.",
        "",
        "| loss | peak | setup MiB | training MiB | command MiB |",
        "|---|---|---:|---:|---:|",
    ]
    for loss in LOSSES:
        rec = records[loss]
        for kind, name in (("", "RSS"), ("_anon", "anonymous")):
            cells = " | ".join(f"{rec[f'{f}{kind}_bytes'] / MIB:,.0f}" for f in FIGURES)
            lines.append(f"| {loss} | {name} | {cells} |")
    for kind, name in (("", "RSS"), ("_anon", "anonymous")):
        cells = " | ".join(f"**{r[f + kind]:.3f}**" for f in FIGURES)
        lines.append(f"| MoDE / final-only | {name} | {cells} |")
    lines += [
        "",
        "Steps: "
        + ", ".join(
            f"{loss} {records[loss]['step_seconds']:.2f} s ({records[loss]['target_tokens_per_step']:.0f}"
            " target tokens)"
            for loss in LOSSES
        )
        + f"; MoDE / final-only step time {r['step_time']:.2f}. Target: MoDE's peak within "
        f"{TARGET}x of final-only's: training RSS {verdict(r['training'])}, training anonymous "
        f"{verdict(r['training_anon'])}, command RSS {verdict(r['command'])}.",
    ]
    return "\n".join(lines)


def verdict(ratio: float) -> str:
    return "holds" if ratio <= TARGET else "**misses**"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="training steps per run")
    parser.add_argument("--recipe", default=RECIPE, help="another recipe, to try the script")
    parser.add_argument("--doc", default=str(DOC), help="'' writes no document")
    parser.add_argument("--json", action="store_true", help="print the records as JSON")
    parser.add_argument("--from-json", help="rewrite the doc's section from saved `--json` records")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--plan-worker", help=argparse.SUPPRESS)
    parser.add_argument(
        "--calibrate",
        action="store_true",
        help="the memory plan against measured runs (SmolLM2 and tiny grid, over an hour): fit "
        "the CPU constants, write its section of docs/benchmarks.md",
    )
    parser.add_argument(
        "--write-constants",
        action="store_true",
        help="with --calibrate: "
        "write the fitted constants into mode_cli/train/memory_calibration.json",
    )
    parser.add_argument("--tiny-only", action="store_true", help="with --calibrate: tiny models")
    parser.add_argument("--smollm2-only", action="store_true", help="with --calibrate: SmolLM2")
    parser.add_argument("--json-out", help="with --calibrate: save the runs as JSON here")
    parser.add_argument(
        "--continue",
        dest="resume",
        action="store_true",
        help="with --calibrate --json-out: keep the runs that file holds, measure only the rest",
    )
    parser.add_argument(
        "--refit",
        help="runs saved by --json-out: predict them with the current code, fit again and "
        "rewrite the section, without running them again",
    )
    parser.add_argument(
        "--keep-constants",
        action="store_true",
        help="with --calibrate or --refit: predict with the constants mode ships "
        "(mode_cli/train/memory_calibration.json) instead of fitting new ones, so runs left out "
        "of their fit test them",
    )
    parser.add_argument("extra", nargs="*", help="more overrides for both runs")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.plan_worker:
        recipe, overrides = json.loads(args.plan_worker)
        print(json.dumps(plan_worker(recipe, overrides)))
        return
    if args.calibrate or args.refit:
        calibrate(args)
        return
    if args.from_json:
        records = json.loads(Path(args.from_json).read_text())
        text = markdown(records, args.steps, args.extra, args.recipe)
        write_section("bench_memory", text, args.doc)
        return
    records = {loss: run(loss, args.steps, args.extra, args.recipe) for loss in LOSSES}
    r = ratios(records)
    print("MoDE / final-only: " + ", ".join(f"{k} {v:.3f}" for k, v in r.items()), file=sys.stderr)
    if args.doc:
        text = markdown(records, args.steps, args.extra, args.recipe)
        write_section("bench_memory", text, args.doc)
        print(f"wrote {args.doc}", file=sys.stderr)
    if args.json:
        print(json.dumps(records, indent=1))


# ---------------------------------------------------------------------------- the memory plan

# The grid the plan is calibrated and checked on (`--calibrate`): SmolLM2 at micro-batches 1, 4
# and 16, two lengths, with and without gradient checkpointing, final-only and MoDE; each tiny
# family at two shapes. Every batch is full: text longer than the length, split into it.
PLAN_STEPS = 3
SMOLLM2_GRID = [
    (batch, length, checkpointing, loss)
    for batch in (1, 4, 16)
    for length in (128, 256)
    for checkpointing in (False, True)
    for loss in ("final-only", "mode")
]
TINY_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "gpt-neox")
TINY_GRID = [(4, 128, False, "mode"), (16, 256, True, "final-only")]
SMOLLM2_TOLERANCE = 0.15
TINY_TOLERANCE = (0.15, 30 * MIB)  # relative, or absolute where that is larger
CALIBRATION_FILE = ROOT / "mode_cli" / "train" / "memory_calibration.json"


def plan_configs(smollm2: bool = True, tiny: bool = True) -> list[dict]:
    """The runs of the grid: recipe and the settings that vary."""
    configs = []
    # The tiny families first, then SmolLM2 from the smallest micro-batch: a grid stopped early
    # (and continued with --continue) has measured the quick runs.
    if tiny:
        for family in TINY_FAMILIES:
            for batch, length, checkpointing, loss in TINY_GRID:
                configs.append(
                    dict(
                        recipe=f"tiny-{family}-alpaca",
                        batch=batch,
                        length=length,
                        gc=checkpointing,
                        loss=loss,
                    )
                )
    if smollm2:
        for batch, length, checkpointing, loss in SMOLLM2_GRID:
            configs.append(
                dict(recipe=RECIPE, batch=batch, length=length, gc=checkpointing, loss=loss)
            )
    return configs


def text_data(folder: Path) -> Path:
    """Training text long enough that every micro-batch is full: the bundled pages, joined."""
    pages = ROOT / "mode_cli" / "bundled" / "text" / "train.jsonl"
    joined = " ".join(json.loads(line)["text"] for line in pages.read_text().splitlines())
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps({"text": joined}) + "\n" for _ in range(2)))
    return path


def plan_overrides(config: dict, data: Path) -> list[str]:
    return [
        f"train.micro_batch_size={config['batch']}",
        f"data.max_seq_len={config['length']}",
        f"train.gradient_checkpointing={str(config['gc']).lower()}",
        f"loss={config['loss']}",
        "data.format=text",
        f"data.train={data}",
        "data.eval=bundled:text/eval.jsonl",
        "data.packing=false",
        "data.max_train_examples=null",
        f"train.max_steps={PLAN_STEPS}",
        "checkpoint.every_steps=null",
        "merge=false",
    ]


def plan_worker(recipe: str, overrides: list[str]) -> dict:
    """One training run in this process: its peak RSS during training over the process's RSS
    after its imports (and the setup's peak, loading included, for the record)."""
    import bitsandbytes  # noqa: F401  everything training imports, before the baseline
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from mode_cli.cli import _quiet_libraries
    from mode_cli.recipes import compose_recipe
    from mode_cli.train import recipe as recipe_mod

    _quiet_libraries()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_recipe(recipe, [*overrides, f"output_dir={tmp}/run"])
        baseline = status("VmRSS")
        run = recipe_mod.FinetuneRecipe(cfg)
        run.setup_data()
        run.setup_model()
        run.start_new_run()
        setup = status("VmHWM")
        reset_peak()
        run.save_checkpoint = lambda *args, **kwargs: (
            None
        )  # a checkpoint's buffers are not training's
        run.train()
        training = status("VmHWM")
        tokens = run.train_set.stats.tokens
    return {
        "baseline_bytes": baseline,
        "setup_peak_bytes": setup - baseline,
        "training_peak_bytes": training - baseline,
        "data_tokens": tokens,
    }


# What a grid run measures (`plan_worker`), as opposed to what the plan predicts of it.
MEASURED = ("baseline_bytes", "setup_peak_bytes", "training_peak_bytes", "data_tokens")


def run_key(config: dict) -> tuple:
    """A grid run's settings, naming it among the others."""
    return tuple(config[k] for k in ("recipe", "batch", "length", "gc", "loss"))


def measure_plan_config(config: dict, data: Path) -> dict:
    """A grid run in its own process; its measurement."""
    args = json.dumps([config["recipe"], plan_overrides(config, data)])
    return run_worker(__file__, ["--plan-worker", args], str(config))


def predictions(config: dict, data: Path, data_tokens: int, facts_cache: dict) -> dict:
    """The plan of a grid run: its peak with the shipped constants, and the parts the constants
    multiply (what the tensors and data hold; what a forward pass allocates; the vocabulary)."""
    from mode_cli.recipes import compose_recipe
    from mode_cli.train.fit import DATA_BYTES_PER_TOKEN, recipe_setup
    from mode_cli.train.footprint import model_facts
    from mode_cli.train.memory import CALIBRATION, activation_bytes, plan_memory

    cfg = compose_recipe(config["recipe"], plan_overrides(config, data))
    key = (config["recipe"], config["loss"])
    if key not in facts_cache:
        facts_cache[key] = model_facts(cfg)
    facts = facts_cache[key]
    setup = recipe_setup(cfg, facts, "cpu", 1, data_tokens * DATA_BYTES_PER_TOKEN)
    shipped = CALIBRATION["cpu"]
    bare = replace(
        shipped,
        runtime=0.0,
        working_layers=0.0,
        slack=0.0,
        slack_checkpointed=0.0,
        tokenizer_per_entry=0.0,
    )
    return {
        "predicted_bytes": plan_memory(facts, setup, calibration=shipped).peak,
        "tensors_bytes": plan_memory(facts, setup, calibration=bare).peak,
        "forward_bytes": facts.num_layers * activation_bytes(facts, setup, bare)["layer"],
        "layer_bytes": activation_bytes(facts, setup, bare)["layer"],
        "vocab": facts.vocab_size,
    }


TOKENIZER_WORKER = """
import sys
from pathlib import Path

def rss():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

import bitsandbytes, datasets, peft, torch, transformers
from mode_cli.recipes import compose_recipe
from mode_cli.models.loading import load_tokenizer, resolve_source

cfg = compose_recipe(sys.argv[1], [])
source = resolve_source(cfg.model)
before = rss()
tokenizer = load_tokenizer(source, cfg.model)
print(rss() - before, len(tokenizer))
"""


def tokenizer_bytes_per_entry() -> float:
    """What a loaded tokenizer adds to the process per vocabulary entry: SmolLM2's (49,152)
    against a tiny model's (512), each loaded in a fresh process after the imports."""
    sizes = []
    for recipe in (RECIPE, "tiny-llama-alpaca"):
        done = subprocess.run(
            [sys.executable, "-c", TOKENIZER_WORKER, recipe],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
            start_new_session=True,
        )
        if done.returncode != 0:
            raise SystemExit(f"the tokenizer of {recipe} failed to load:\n{done.stderr[-2000:]}")
        grown, entries = done.stdout.split()[-2:]
        sizes.append((int(entries), float(grown)))
    (big, big_bytes), (small, small_bytes) = sizes
    return (big_bytes - small_bytes) / (big - small)


def fit_constants(records: list[dict], per_entry: float) -> dict:
    """The CPU constants minimising the relative error of `tensors + tokenizer + runtime +
    working_layers x one layer + slack (slack_checkpointed with checkpointing) x forward` over
    the grid (weighted least squares, four unknowns)."""
    import numpy as np

    rows = np.array(
        [
            [
                1.0,
                r["layer_bytes"],
                r["forward_bytes"] * (not r["gc"]),
                r["forward_bytes"] * r["gc"],
            ]
            for r in records
        ]
    )
    target = np.array(
        [r["training_peak_bytes"] - r["tensors_bytes"] - per_entry * r["vocab"] for r in records]
    )
    weight = 1.0 / np.array([r["training_peak_bytes"] for r in records])
    solution, *_ = np.linalg.lstsq(rows * weight[:, None], target * weight, rcond=None)
    runtime, working, slack, checkpointed = (float(x) for x in solution)
    return {
        "runtime": runtime,
        "working_layers": working,
        "slack": slack,
        "slack_checkpointed": checkpointed,
        "tokenizer_per_entry": per_entry,
    }


def predict(record: dict, constants: dict) -> float:
    """The plan's peak of a grid run with these constants."""
    share = constants["slack_checkpointed"] if record["gc"] else constants["slack"]
    return (
        record["tensors_bytes"]
        + constants["tokenizer_per_entry"] * record["vocab"]
        + constants["runtime"]
        + constants["working_layers"] * record["layer_bytes"]
        + share * record["forward_bytes"]
    )


def error_of(record: dict) -> float:
    return record["predicted_bytes"] / record["training_peak_bytes"] - 1


def within(record: dict) -> bool:
    """The acceptance: SmolLM2 within 15%; a tiny family within 15% or 30 MiB."""
    miss = abs(record["predicted_bytes"] - record["training_peak_bytes"])
    if record["recipe"] == RECIPE:
        return miss <= SMOLLM2_TOLERANCE * record["training_peak_bytes"]
    relative, absolute = TINY_TOLERANCE
    return miss <= max(relative * record["training_peak_bytes"], absolute)


def plan_markdown(
    records: list[dict],
    constants: dict,
    seconds: float,
    note: str = "",
    fitted_on: int | None = None,
) -> str:
    import torch

    held = sum(within(r) for r in records)
    worst = {
        group: max(
            abs(error_of(r)) for r in records if (r["recipe"] == RECIPE) == (group == "smollm2")
        )
        for group in ("smollm2", "tiny")
        if any((r["recipe"] == RECIPE) == (group == "smollm2") for r in records)
    }
    lines = [
        "## The memory plan against measurements (CPU)",
        "",
        "`mode plan` / `mode train --dry-run` predict a run's peak from the recipe and the "
        "model's config.json (`mode_cli/train/memory.py`); here each prediction is set against "
        "the run itself (`python scripts/bench_memory.py --calibrate`): the real training loop, "
        f"{PLAN_STEPS} optimizer steps, each run in its own process, measured as the peak RSS "
        "during training over the process's RSS after its imports (loading's own transient, "
        "the checkpoint file mapped while it is read, is page cache and not part of it). Every "
        "micro-batch is full (plain text longer than the length). The CPU constants were fitted "
        + (
            "on these runs"
            if fitted_on in (None, len(records))
            else f"on {fitted_on} runs of this grid (the rest held out)"
        )
        + " by the same command (weighted least squares, relative error): runtime "
        f"{constants['runtime'] / MIB:.0f} MiB; a layer's working memory "
        f"{constants['working_layers']:.2f} x its saved activations; allocator slack "
        f"{constants['slack']:.2f} x what a forward pass allocates, "
        f"{constants['slack_checkpointed']:.2f} x with gradient checkpointing (glibc keeps "
        "memory freed mid-step for reuse); and, measured apart, "
        f"{constants['tokenizer_per_entry']:,.0f} bytes a vocabulary entry for the tokenizer "
        "(`mode_cli/train/memory_calibration.json`).",
        "",
        f"Machine: {cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}; the grid "
        f"took {seconds / 60:.0f} min. Targets: SmolLM2 within {SMOLLM2_TOLERANCE:.0%}, a tiny "
        f"family within {TINY_TOLERANCE[0]:.0%} or {TINY_TOLERANCE[1] / MIB:.0f} MiB."
        + (f" {note}" if note else ""),
        "",
        "| model | micro-batch | length | checkpointing | loss | predicted MiB | measured MiB | error | |",
        "|---|---:|---:|---|---|---:|---:|---:|---|",
    ]
    for r in records:
        model = "SmolLM2-135M" if r["recipe"] == RECIPE else r["recipe"].removesuffix("-alpaca")
        lines.append(
            f"| {model} | {r['batch']} | {r['length']} | {'on' if r['gc'] else 'off'} | {r['loss']} "
            f"| {r['predicted_bytes'] / MIB:,.0f} | {r['training_peak_bytes'] / MIB:,.0f} "
            f"| {error_of(r):+.1%} | {'holds' if within(r) else '**misses**'} |"
        )
    lines += [
        "",
        f"{held} of {len(records)} within target; largest error "
        + ", ".join(f"{name} {value:.1%}" for name, value in worst.items())
        + ".",
        "",
        "On CUDA the plan is not measured yet: no GPU has run `scripts/gpu_check.py` part g (the "
        "plan against `torch.cuda.max_memory_allocated` and `max_memory_reserved` of the "
        "Llama-3-8B-shaped model), so its CUDA constants are estimates.",
    ]
    return "\n".join(lines)


def calibrate(args) -> None:
    """Run the grid, fit the CPU constants, write them and the doc's section."""

    started = time.perf_counter()
    records, cache = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        data = text_data(Path(tmp))
        note = ""  # how the runs were made, where that needs saying (kept in the runs' file)
        if args.refit:
            saved = json.loads(Path(args.refit).read_text())
            runs, seconds, note = saved["runs"], saved["seconds"], saved.get("note", "")
        else:
            runs = plan_configs(smollm2=not args.tiny_only, tiny=not args.smollm2_only)
        kept, earlier = {}, 0.0
        if args.resume and args.json_out and Path(args.json_out).is_file():
            saved = json.loads(Path(args.json_out).read_text())
            kept = {run_key(r): r for r in saved["runs"]}
            earlier = saved.get("seconds", 0.0)  # the time the kept runs took
            note = saved.get("note", "")
        for config in runs:
            if args.refit:
                record = dict(config)
            elif run_key(config) in kept:
                record = {**config, **{k: kept[run_key(config)][k] for k in MEASURED}}
            else:
                record = {**config, **measure_plan_config(config, data)}
            record.update(predictions(config, data, record["data_tokens"], cache))
            records.append(record)
            print(
                f"{config['recipe']} {config['batch']} x {config['length']} gc={config['gc']} "
                f"{config['loss']}: measured {record['training_peak_bytes'] / MIB:,.0f} MiB, "
                f"tensors {record['tensors_bytes'] / MIB:,.0f}, forward "
                f"{record['forward_bytes'] / MIB:,.0f}",
                file=sys.stderr,
            )
            if args.json_out:  # after every run: a stopped grid keeps what it measured
                done = {run_key(r) for r in records}
                waiting = [r for key, r in kept.items() if key not in done]
                so_far = earlier + time.perf_counter() - started
                Path(args.json_out).write_text(
                    json.dumps(
                        {"runs": records + waiting, "seconds": so_far, "note": note}, indent=1
                    )
                )
    if args.keep_constants:
        shipped = json.loads(CALIBRATION_FILE.read_text())["cpu"]
        fitted_on = shipped.pop("fitted_on")
        constants = shipped
    else:
        constants = fit_constants(records, tokenizer_bytes_per_entry())
        fitted_on = len(records)
    if args.write_constants and not args.keep_constants:
        fitted = {"cpu": {**constants, "fitted_on": len(records)}}
        CALIBRATION_FILE.write_text(json.dumps(fitted, indent=1) + "\n")
    for record in records:
        record["predicted_bytes"] = predict(record, constants)
    if not args.refit:
        seconds = earlier + time.perf_counter() - started
    if args.json_out:
        record = {"constants": constants, "seconds": seconds, "note": note, "runs": records}
        Path(args.json_out).write_text(json.dumps(record, indent=1) + "\n")
    text = plan_markdown(records, constants, seconds, note, fitted_on)
    if args.doc:
        write_section("memory_plan", text, args.doc)
    print(text)


if __name__ == "__main__":
    main()
