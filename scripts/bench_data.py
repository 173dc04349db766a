"""Data at the size users bring: tokenizing speed, the whole command's peak memory, and the
tokenized cache's effect on the time to the first step.

Two generated Alpaca-style JSON-lines files (200,000 and 1,000,000 rows by default: short
instructions, a third with an input, answers of one or two sentences). For each:

- tokenizing: `load_splits` with `data.cache=false` and `data.num_proc` 1, then 2, each in a
  process of its own; rows/s of the check pass, of the tokenizing pass, and of the whole load
  (checking, choosing the splits, tokenizing, counting);
- runs: `mode train recipe=tiny-llama-alpaca data.train=FILE data.eval=null
  data.max_train_examples=null train.max_steps=1 merge=false`, each in a process of its own with
  a fresh data cache, twice: the first tokenizes (auto: the available cores), the second finds
  the cache. Per run: peak RSS of the command's process (VmHWM, what `ru_maxrss` reports) and its
  peak anonymous memory (RssAnon sampled every 2 ms), the largest worker process's peak RSS, and
  the time from launching the command to the end of its first training step.

Targets: the command's peak RSS at 5x the rows under 1.3x; the cached run's time to the first
step under 10% of the first run's.

    python scripts/bench_data.py                            # writes its section of docs/benchmarks.md
    python scripts/bench_data.py --rows 2000 10000 --doc ''  # a quick try
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchdoc  # noqa: E402
from bench_memory import AnonPeak, status  # noqa: E402
from benchdoc import DOC, cpu_model, write_section  # noqa: E402

MIB = 2**20
RSS_TARGET = 1.3  # peak RSS at the larger size over the smaller
CACHED_TARGET = 0.10  # the cached run's time to the first step over the first run's
RECIPE = "tiny-llama-alpaca"

SUBJECTS = ["apples", "trains", "rivers", "a library", "the moon", "bread", "a garden", "chess"]
VERBS = ["describe", "explain", "summarise", "list three facts about", "write a haiku about"]
WORDS = [
    "the",
    "a",
    "of",
    "to",
    "and",
    "in",
    "is",
    "it",
    "that",
    "was",
    "for",
    "on",
    "are",
    "with",
    "as",
    "be",
    "at",
    "by",
    "this",
    "from",
    "have",
    "or",
    "an",
    "they",
    "which",
    "one",
    "you",
    "had",
    "not",
    "but",
    "all",
    "were",
    "when",
    "we",
    "there",
    "can",
    "been",
    "has",
    "more",
    "if",
    "will",
    "so",
    "no",
    "out",
    "up",
    "time",
    "people",
    "water",
    "light",
    "small",
    "large",
    "early",
    "late",
    "bright",
    "quiet",
    "quick",
    "slow",
    "warm",
    "cold",
]


def generate(path: Path, rows: int, seed: int = 0) -> Path:
    """An Alpaca-style JSON-lines file of `rows` short rows (a third with an input)."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as handle:
        for i in range(rows):
            subject, verb = rng.choice(SUBJECTS), rng.choice(VERBS)
            row = {"instruction": f"Please {verb} {subject} (item {i})."}
            if i % 3 == 0:
                row["input"] = " ".join(rng.choices(WORDS, k=rng.randint(4, 12)))
            sentences = [
                " ".join(rng.choices(WORDS, k=rng.randint(6, 16))).capitalize() + "."
                for _ in range(rng.randint(1, 2))
            ]
            row["output"] = " ".join(sentences)
            handle.write(json.dumps(row) + "\n")
    return path


# ---------------------------------------------------------------------------- tokenizing


def tokenize_worker(path: str, processes: int) -> dict:
    """load_splits of the file without the cache, the check and tokenizing passes timed."""
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer

    from mode_cli.config import DataConfig
    from mode_cli.data import splits, store
    from mode_cli.files import resolve_bundled

    timed: dict = {"check": 0.0, "tokenize": 0.0}

    def timing(name, function):
        def run(*args, **kwargs):
            start = time.perf_counter()
            result = function(*args, **kwargs)
            timed[name] += time.perf_counter() - start
            return result

        return run

    store.write_scan = timing("check", store.write_scan)
    store.write_tokens = timing("tokenize", store.write_tokens)
    tokenizer = AutoTokenizer.from_pretrained(str(resolve_bundled("bundled:tiny-tokenizer")))
    values = {
        "train": path,
        "eval": None,
        "max_seq_len": 128,
        "cache": False,
        "num_proc": processes,
    }
    cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), values)
    start = time.perf_counter()
    train, evaluation = splits.load_splits(cfg, tokenizer)
    total = time.perf_counter() - start
    return {
        "rows": train.stats.rows + evaluation.stats.rows,
        "tokens": train.stats.tokens + evaluation.stats.tokens,
        "load_s": total,
        "check_s": timed["check"],
        "tokenize_s": timed["tokenize"],
    }


def tokenize(path: Path, processes: int) -> dict:
    load = os.getloadavg()[0]
    record = worker(["--tokenize-worker", str(path), str(processes)])
    record["processes"] = processes
    record["load"] = (load + os.getloadavg()[0]) / 2
    print(
        f"{path.name}: {processes} process(es): load {record['rows'] / record['load_s']:,.0f} "
        f"rows/s, tokenize {record['rows'] / record['tokenize_s']:,.0f} rows/s",
        file=sys.stderr,
    )
    return record


# ---------------------------------------------------------------------------- runs


def run_args(path: Path, out: Path) -> list[str]:
    return [
        "train",
        f"recipe={RECIPE}",
        f"data.train={path}",
        "data.eval=null",
        "data.max_train_examples=null",
        "train.max_steps=1",
        "merge=false",
        f"output_dir={out}",
    ]


def run_worker(args: list[str], launched: float) -> dict:
    """`mode ARGS` in this process: peak memory, and when the first step ended."""
    from mode_cli.cli import main
    from mode_cli.train import recipe as recipe_mod

    anon = AnonPeak()
    first: dict = {}
    step = recipe_mod.accumulate_gradients

    def timed_step(*a, **k):
        result = step(*a, **k)
        first.setdefault("first_step_s", time.time() - launched)
        return result

    recipe_mod.accumulate_gradients = timed_step
    code = main(args)
    if code != 0:
        raise SystemExit(f"mode {' '.join(args)} exited {code}")
    anon.stop()
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return {
        **first,
        "command_bytes": status("VmHWM"),
        "command_anon_bytes": anon.take(),
        "worker_bytes": children,
        "total_s": time.time() - launched,
    }


def run(path: Path, cache: Path, out: Path, label: str) -> dict:
    env = {**os.environ, "MODE_DATA_CACHE": str(cache)}
    record = worker(["--run-worker", json.dumps(run_args(path, out))], env)
    record["label"] = label
    record["cache_bytes"] = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
    print(
        f"{path.name} {label}: peak RSS {record['command_bytes'] / MIB:,.0f} MiB (anonymous "
        f"{record['command_anon_bytes'] / MIB:,.0f}), largest worker "
        f"{record['worker_bytes'] / MIB:,.0f} MiB; first step after {record['first_step_s']:.1f} s",
        file=sys.stderr,
    )
    return record


def worker(args: list[str], env: dict | None = None) -> dict:
    """This script as a worker (`benchdoc.run_worker`), told when it was launched."""
    launched = ["--launched", repr(time.time())]
    return benchdoc.run_worker(__file__, [*args, *launched], " ".join(args)[:200], env)


# ---------------------------------------------------------------------------- the page


def measure(sizes: list[int], workdir: Path) -> dict:
    results: dict = {"sizes": sizes, "tokenizing": [], "runs": {}}
    for rows in sizes:
        path = workdir / f"alpaca-{rows}.jsonl"
        if not path.is_file():
            generate(path, rows)
        results.setdefault("file_bytes", {})[str(rows)] = path.stat().st_size
        for processes in (1, 2):
            results["tokenizing"].append({"size": rows, **tokenize(path, processes)})
        cache = workdir / f"cache-{rows}"
        runs = [
            run(path, cache, workdir / f"run-{rows}-{label}", label)
            for label in ("first", "cached")
        ]
        results["runs"][str(rows)] = runs
    return results


def ratios(results: dict) -> dict:
    small, large = (str(s) for s in (results["sizes"][0], results["sizes"][-1]))
    first = {size: results["runs"][size][0] for size in (small, large)}
    return {
        "rss": first[large]["command_bytes"] / first[small]["command_bytes"],
        "anon": first[large]["command_anon_bytes"] / first[small]["command_anon_bytes"],
        "cached": {
            size: runs[1]["first_step_s"] / runs[0]["first_step_s"]
            for size, runs in results["runs"].items()
        },
    }


def markdown(results: dict, seconds: float) -> str:
    import torch

    r = ratios(results)
    small, large = results["sizes"][0], results["sizes"][-1]
    lines = [
        "## Data at scale: tokenizing, peak memory, the tokenized cache",
        "",
        f"Generated Alpaca-style JSON-lines files of {small:,} and {large:,} rows (short "
        "instructions, a third with an input, answers of one or two sentences; "
        + ", ".join(
            f"{int(size):,} rows: {size_bytes / MIB:,.0f} MiB"
            for size, size_bytes in results["file_bytes"].items()
        )
        + "), the tiny recipe's tokenizer, `data.max_seq_len=128` (`scripts/bench_data.py`).",
        "",
        f"Machine: {cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}. Other jobs "
        f"shared the machine, so times are noisy; the whole benchmark took {seconds / 60:.1f} min.",
        "",
        "### Tokenizing",
        "",
        "`load_splits` with `data.cache=false`, in a process of its own per line: the check pass "
        "(every row parsed and checked), the tokenizing pass, and the whole load.",
        "",
        "| rows | processes | check rows/s | tokenize rows/s | whole load rows/s | tokens | "
        "load average |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for t in results["tokenizing"]:
        lines.append(
            f"| {t['size']:,} | {t['processes']} | {t['rows'] / t['check_s']:,.0f} | "
            f"{t['rows'] / t['tokenize_s']:,.0f} | {t['rows'] / t['load_s']:,.0f} | "
            f"{t['tokens']:,} | {t['load']:.1f} |"
        )
    lines += [
        "",
        f"Load average: the machine's 1-minute load average before and after the line, averaged "
        f"({os.cpu_count()} cores): above the core count, other jobs held the cores a second "
        "process would use, and its speed-up could not show.",
    ]
    lines += [
        "",
        "### `mode train ... train.max_steps=1`",
        "",
        f"`mode {' '.join(run_args(Path('FILE'), Path('OUT'))[:-1])}`, each run in a process of "
        "its own with a fresh data cache, the first tokenizing (in the available cores' worker "
        "processes), the second reading the cache. Peak RSS of the command's process (VmHWM), "
        "its peak anonymous memory (RssAnon, sampled every 2 ms; RSS also counts the pages of "
        "the memory-mapped tokens and libraries it touched), the largest worker process's peak "
        "RSS (forked from the command, so it shares most of those pages), and the time from "
        "launching the command to the end of its first step; the data cache's size after it.",
        "",
        "| rows | run | peak RSS MiB | peak anonymous MiB | largest worker MiB | first step after s "
        "| data cache MiB |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for size, runs in results["runs"].items():
        for rec in runs:
            lines.append(
                f"| {int(size):,} | {rec['label']} | {rec['command_bytes'] / MIB:,.0f} | "
                f"{rec['command_anon_bytes'] / MIB:,.0f} | {rec['worker_bytes'] / MIB:,.0f} | "
                f"{rec['first_step_s']:.1f} | {rec['cache_bytes'] / MIB:,.1f} |"
            )
    growth = large / small
    cached = ", ".join(
        f"{int(size):,} rows {ratio:.3f} ({verdict(ratio <= CACHED_TARGET)})"
        for size, ratio in r["cached"].items()
    )
    lines += [
        "",
        "### Targets",
        "",
        f"- Peak RSS of the command at {large:,} rows over {small:,} ({growth:g}x the rows): "
        f"**{r['rss']:.3f}** (target under {RSS_TARGET}: {verdict(r['rss'] < RSS_TARGET)}); "
        f"peak anonymous memory {r['anon']:.3f}.",
        f"- Time to the first step, cached run over first run: {cached} (target under "
        f"{CACHED_TARGET:.0%}).",
    ]
    starts = [
        next(rec["first_step_s"] for rec in runs if rec["label"] == "cached")
        for runs in results["runs"].values()
    ]
    lines.append(
        f"  The cached runs reach their first step after {min(starts):.1f} to {max(starts):.1f} s "
        f"at every size: the command's own start (imports, the model, the first step), which "
        f"reading the cache does not lengthen; the ratio falls as the first run's tokenizing grows."
    )
    return "\n".join(lines)


def verdict(holds: bool) -> str:
    return "holds" if holds else "**misses**"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs=2, default=[200_000, 1_000_000])
    parser.add_argument("--workdir", help="where the files, caches and runs go (default: a temp)")
    parser.add_argument("--doc", default=str(DOC), help="'' writes no document")
    parser.add_argument("--json", help="also save the records to this file")
    parser.add_argument("--from-json", help="rewrite the doc's section from saved records")
    parser.add_argument("--tokenize-worker", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--run-worker", help=argparse.SUPPRESS)
    parser.add_argument("--launched", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tokenize_worker:
        print(json.dumps(tokenize_worker(args.tokenize_worker[0], int(args.tokenize_worker[1]))))
        return
    if args.run_worker:
        print(json.dumps(run_worker(json.loads(args.run_worker), args.launched)))
        return
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        write_section("bench_data", markdown(saved["results"], saved["seconds"]), args.doc)
        return
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        results = measure(sorted(args.rows), workdir)
    seconds = time.perf_counter() - started
    r = ratios(results)
    print(
        f"peak RSS {r['rss']:.3f}x; cached / first time to first step {r['cached']}",
        file=sys.stderr,
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "seconds": seconds}, indent=1))
    if args.doc:
        write_section("bench_data", markdown(results, seconds), args.doc)
        print(f"wrote {args.doc}", file=sys.stderr)


if __name__ == "__main__":
    main()
