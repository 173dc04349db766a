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
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchdoc import DOC, write_section  # noqa: E402

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
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        done = subprocess.run(
            [sys.executable, __file__, "--worker", json.dumps(args)],
            capture_output=True,
            text=True,
            env=env,
            start_new_session=True,
        )
    if done.returncode != 0:
        raise SystemExit(f"loss={loss} failed:\n{done.stderr[-3000:]}")
    record = json.loads(done.stdout.strip().splitlines()[-1])
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


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


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
    parser.add_argument("extra", nargs="*", help="more overrides for both runs")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
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


if __name__ == "__main__":
    main()
