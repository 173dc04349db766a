"""lm-evaluation-harness on a run's two exports, the MoDE ensemble and the final layer, and the
ensemble export's log-likelihoods checked against mode's own ensemble.

- `<run>/merged` (the ensemble export, `--model hf` with `trust_remote_code=True`) and the run
  exported with `head=final` (a plain `hf` model, into a temporary folder) are scored on mode's
  bundled harness tasks: `mode_arithmetic_mc` (accuracy of the most likely of four answers) and
  `mode_arithmetic_gen` (exact match of greedy answers).
- Every choice's log-likelihood the harness computed for the ensemble export is compared with the
  one mode's ensemble gives on the run folder itself (`mode_cli.load`: the 4-bit base and the
  adapter, as trained), tokenized as the harness tokenizes it.

    python scripts/harness_exports.py                 # the newest outputs/smollm2-arithmetic/* run
    python scripts/harness_exports.py --run RUN --limit 50

Prints the scores as a Markdown table (README, "Evaluating with lm-evaluation-harness") and writes
them with the comparison to `<run>/harness.json`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchdoc import newest_run  # noqa: E402

TOLERANCE = 1e-4


def continuation_logprobs(model, tokenizer, context: str, continuations: list[str]) -> list[float]:
    """Each continuation's summed log-probability after `context`, split as lm-evaluation-harness
    splits it (trailing whitespace of the context moves to the continuation), in one batch."""
    import torch

    stripped = context.rstrip()
    moved = context[len(stripped) :]
    context_ids = tokenizer(stripped)["input_ids"]
    wholes = [tokenizer(stripped + moved + c)["input_ids"] for c in continuations]
    width = max(len(ids) for ids in wholes)
    pad = tokenizer.pad_token_id
    batch = torch.tensor([ids + [pad] * (width - len(ids)) for ids in wholes])
    mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in wholes])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=batch, attention_mask=mask).logits.float(), -1)
    return [
        float(sum(logprobs[row, pos - 1, ids[pos]] for pos in range(len(context_ids), len(ids))))
        for row, ids in enumerate(wholes)
    ]


def compare_with_mode(run: Path, samples: list[dict]) -> dict:
    """The largest difference between the harness's log-likelihoods of the ensemble export and
    mode's ensemble on the run, over every document and choice."""
    from mode_cli import load

    model, tokenizer = load(run, device="cpu")
    worst, over, items = 0.0, 0, 0
    for sample in samples:
        doc = sample["doc"]
        harness = [resp[0][0] for resp in sample["resps"]]
        ours = continuation_logprobs(model, tokenizer, doc["prompt"], doc["choices"])
        for a, b in zip(harness, ours, strict=True):
            worst = max(worst, abs(a - b))
            over += abs(a - b) > TOLERANCE
            items += 1
    return {"items": items, "max_abs_difference": worst, "over_tolerance": over}


def scores(results: dict) -> dict:
    from mode_cli.eval.harness import TASK_SCORES

    found = {task: results["results"][task][key] for task, key in TASK_SCORES.items()}
    return {"mc_acc": found["mode_arithmetic_mc"], "gen_exact_match": found["mode_arithmetic_gen"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a run folder (default: the newest demo run)")
    parser.add_argument("--limit", type=int, help="documents per task (default: all 200)")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)

    from mode_cli.eval.harness import command, evaluate
    from mode_cli.export.command import export

    run = args.run or newest_run()
    ensemble = run / "merged"
    started = time.time()
    record: dict = {"run": str(run), "limit": args.limit}
    with tempfile.TemporaryDirectory() as tmp:
        final = export(run, Path(tmp) / "final", head="final")
        for name, folder in (("ensemble", ensemble), ("final", final)):
            print(" ".join(command(folder)), flush=True)
            results = evaluate(
                folder, limit=args.limit, batch_size=args.batch_size, log_samples=True
            )
            record[name] = scores(results)
            if name == "ensemble":
                samples = results["samples"]["mode_arithmetic_mc"]
    record["ensemble_vs_mode"] = compare_with_mode(run, samples)
    record["wall_s"] = round(time.time() - started, 1)
    (run / "harness.json").write_text(json.dumps(record, indent=2) + "\n")
    check = record["ensemble_vs_mode"]
    print()
    print("| export | `mode_arithmetic_mc` acc | `mode_arithmetic_gen` exact match |")
    print("|---|---:|---:|")
    for name, title in (("ensemble", "`merged/` (MoDE ensemble)"), ("final", "`head=final`")):
        print(f"| {title} | {record[name]['mc_acc']:.3f} | {record[name]['gen_exact_match']:.3f} |")
    print()
    print(
        f"ensemble export vs mode's ensemble on the run: {check['items']} log-likelihoods, largest "
        f"difference {check['max_abs_difference']:.2e}, {check['over_tolerance']} over "
        f"{TOLERANCE:g}; {record['wall_s']:.0f} s; written to {run / 'harness.json'}"
    )


if __name__ == "__main__":
    main()
