"""Greedy decoding speed in plain transformers: a run's MoDE ensemble export against its final-layer
export, side by side in one process.

The two folders hold the same merged model (the demo run's: SmolLM2-135M with the LoRA adapter
merged, fp32): `<run>/merged`, the ensemble export, loaded with `trust_remote_code=True`, and the
run exported with `head=final` into a temporary folder, a plain `LlamaForCausalLM`. Each is loaded
with `AutoModelForCausalLM.from_pretrained`; then, round after round, each prompt (the Alpaca
prompts of the bundled arithmetic eval questions) is greedy-decoded by both, back to back, the
first alternating, batch 1, KV cache on, exactly `--new-tokens` tokens each (EOS ignored, so both
decode the same number of tokens). Tokens per second is new tokens over `generate()`'s wall time
(the prompt's prefill included); the ratio is over all rounds together.

    python scripts/bench_export.py                  # the newest outputs/smollm2-arithmetic/* run
    python scripts/bench_export.py --run RUN --rounds 3 --doc ''

Writes its section of docs/benchmarks.md (`--doc ''` prints it only).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchdoc import DOC, cpu_model, newest_run, write_section  # noqa: E402

GOAL = 0.95  # the ensemble's decoding speed over the final layer's
EXPORTS = ("ensemble", "final")


def prompts(count: int) -> list[str]:
    from mode_cli.data.formats import alpaca_prompt
    from mode_cli.files import resolve_bundled

    rows = resolve_bundled("bundled:arithmetic/eval.jsonl").read_text().splitlines()[:count]
    return [alpaca_prompt(json.loads(row)) for row in rows]


def decode_seconds(model, tokenizer, text: str, new_tokens: int) -> float:
    """Wall time of greedy-decoding `new_tokens` tokens after one prompt."""
    import torch

    inputs = tokenizer(text, return_tensors="pt")
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            **inputs,
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=tokenizer.pad_token_id,
        )
    seconds = time.perf_counter() - start
    assert out.shape[1] - inputs["input_ids"].shape[1] == new_tokens
    return seconds


def measure(run: Path, rounds: int, count: int, new_tokens: int, threads: int) -> dict:
    """Each round decodes every prompt with both exports back to back, the first alternating from
    prompt to prompt and round to round, so a change in the machine's load between them falls on
    both alike."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mode_cli.export.command import export

    torch.set_num_threads(threads)
    texts = prompts(count)
    seconds: dict[str, list[float]] = {name: [0.0] * rounds for name in EXPORTS}
    with tempfile.TemporaryDirectory() as tmp:
        folders = {
            "ensemble": run / "merged",
            "final": export(run, Path(tmp) / "final", head="final"),
        }
        models = {
            name: AutoModelForCausalLM.from_pretrained(
                folder, trust_remote_code=name == "ensemble", dtype=torch.float32
            ).eval()
            for name, folder in folders.items()
        }
        classes = {name: type(model).__name__ for name, model in models.items()}
        tokenizer = AutoTokenizer.from_pretrained(folders["final"])
        for name in EXPORTS:  # warm-up
            decode_seconds(models[name], tokenizer, texts[0], 4)
        for round_ in range(rounds):
            for i, text in enumerate(texts):
                order = EXPORTS if (round_ + i) % 2 == 0 else EXPORTS[::-1]
                for name in order:
                    seconds[name][round_] += decode_seconds(
                        models[name], tokenizer, text, new_tokens
                    )
    tokens = count * new_tokens
    rates = {name: [tokens / s for s in values] for name, values in seconds.items()}
    return {
        "run": str(run),
        "classes": classes,
        "rounds": rounds,
        "prompts": count,
        "new_tokens": new_tokens,
        "threads": threads,
        "tokens_per_s": rates,
        "median": {name: statistics.median(values) for name, values in rates.items()},
        # All rounds together: the ensemble's tokens/s over the final layer's.
        "ratio": sum(seconds["final"]) / sum(seconds["ensemble"]),
        "round_ratios": [f / e for e, f in zip(seconds["ensemble"], seconds["final"], strict=True)],
    }


def markdown(result: dict) -> str:
    import torch
    import transformers

    ratio = result["ratio"]
    lines = [
        "## Decoding speed of the exports in plain transformers: ensemble against final layer",
        "",
        f"`python scripts/bench_export.py`: the demo run's two exports of the same merged model "
        f"(SmolLM2-135M + LoRA, fp32), `merged/` ({result['classes']['ensemble']}, loaded with "
        f"`trust_remote_code=True`) and `mode export head=final` ({result['classes']['final']}), "
        f"each loaded with `AutoModelForCausalLM.from_pretrained` in one process; "
        f"{result['rounds']} rounds of greedy `generate()` on {result['prompts']} Alpaca prompts "
        "of the bundled arithmetic eval set, each prompt by both exports back to back (the first "
        "alternating), batch 1, KV "
        f"cache on, exactly {result['new_tokens']} new tokens each (prefill included), "
        f"{result['threads']} thread(s).",
        "",
        f"Machine: {cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}, transformers "
        f"{transformers.__version__}. Other jobs shared the machine, so absolute speeds are noisy; "
        "the ratio is measured side by side.",
        "",
        "| export | tokens/s (median of rounds) | each round |",
        "|---|---:|---|",
    ]
    for name, title in (("ensemble", "`merged/` (MoDE ensemble)"), ("final", "`head=final`")):
        each = ", ".join(f"{v:.1f}" for v in result["tokens_per_s"][name])
        lines.append(f"| {title} | {result['median'][name]:.1f} | {each} |")
    rounds = ", ".join(f"{r:.3f}" for r in result["round_ratios"])
    verdict = "meets" if ratio >= GOAL else "misses"
    lines += [
        f"| ensemble / final (all rounds) | **{ratio:.3f}** | {rounds} |",
        "",
        f"Goal: the ensemble decodes at >= {GOAL}x the final layer's speed: {verdict} it. The "
        "ensemble adds, per decoded token, the trained norms of the selected layers below the "
        "last, the router and the mix (a few elementwise passes over the hidden size); the LM "
        "head's projection, the largest matmul of a small model, is done once, as in the plain "
        "model.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a run folder (default: the newest demo run)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--doc", default=str(DOC), help="the document to write ('' prints only)")
    args = parser.parse_args(argv)
    result = measure(
        args.run or newest_run(), args.rounds, args.prompts, args.new_tokens, args.threads
    )
    text = markdown(result)
    print(text)
    if args.doc:
        write_section("bench_export", text, args.doc)


if __name__ == "__main__":
    main()
