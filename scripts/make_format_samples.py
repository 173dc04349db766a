"""Generate the bundled chat and plain-text samples from the arithmetic word problems.

Writes, under ``mode_cli/bundled/``:

* ``chat/train.jsonl`` and ``chat/eval.jsonl``: conversations in the ``messages`` format (a list
  of ``{"role", "content"}`` turns). Each has one or two user/assistant exchanges, a third of them
  open with a system turn, and the last assistant turn ends with ``The answer is N.``; the
  ``answer`` column holds that N.
* ``text/train.jsonl`` and ``text/eval.jsonl``: plain-text documents (``text``) for continued
  pretraining, each a short page of worked problems.

Problems come from ``make_arithmetic_data.py`` with their own seed, so train and eval never share
a problem. Only the standard library and one ``random.Random(seed)``: the same arguments always
give byte-identical files. Run from the repository root::

    python scripts/make_format_samples.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from random import Random

sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_arithmetic_data import Problem, generate_problems, write_jsonl  # noqa: E402

BUNDLED = Path(__file__).resolve().parent.parent / "mode_cli" / "bundled"

SYSTEM_PROMPTS = (
    "You are a careful math tutor. Show the calculation, then give the answer.",
    "You solve arithmetic word problems step by step.",
    "Answer with a short worked solution.",
)
FOLLOW_UPS = ("Thanks. Here is another one:", "Good. Now this one:", "Next problem:")


def conversation(rng: Random, problems: list[Problem]) -> dict:
    """One conversation over one or two problems; the answer of the last one is the row's."""
    messages = []
    if rng.random() < 1 / 3:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    for i, problem in enumerate(problems):
        question = problem.text if i == 0 else f"{rng.choice(FOLLOW_UPS)} {problem.text}"
        messages.append({"role": "user", "content": question})
        messages.append({"role": "assistant", "content": problem.output})
    return {"messages": messages, "answer": str(problems[-1].answer)}


def chat_rows(rng: Random, problems: list[Problem], n: int) -> list[dict]:
    """`n` conversations; one in three holds two exchanges."""
    rows, used = [], 0
    for i in range(n):
        take = 2 if i % 3 == 2 else 1
        rows.append(conversation(rng, problems[used : used + take]))
        used += take
    return rows


def text_rows(rng: Random, problems: list[Problem], n: int) -> list[dict]:
    """`n` documents of 2 to 5 worked problems each."""
    rows, used = [], 0
    for _ in range(n):
        take = rng.randint(2, 5)
        lines = [f"Problem: {p.text}\nSolution: {p.output}" for p in problems[used : used + take]]
        rows.append({"text": "Worked examples.\n\n" + "\n\n".join(lines)})
        used += take
    return rows


def problems_needed(n_chat: int, n_text: int) -> int:
    return n_chat + n_chat // 3 + 5 * n_text


def build(seed: int, n_train: int, n_eval: int) -> dict[str, list[dict]]:
    """Rows of every file, keyed by its path under `bundled/`."""
    rng = Random(seed)
    train_pool = generate_problems(rng, 2 * problems_needed(n_train, n_train))
    rng.shuffle(train_pool)
    eval_pool = train_pool[: problems_needed(n_eval, n_eval)]
    train_pool = train_pool[len(eval_pool) :]
    files = {}
    for split, pool, n in (("train", train_pool, n_train), ("eval", eval_pool, n_eval)):
        n_chat = problems_needed(n, 0)
        files[f"chat/{split}.jsonl"] = chat_rows(rng, pool[:n_chat], n)
        files[f"text/{split}.jsonl"] = text_rows(rng, pool[n_chat:], n)
    return files


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    parser.add_argument("--train", type=int, default=120, help="train rows per file (120)")
    parser.add_argument("--eval", type=int, default=24, help="eval rows per file (24)")
    parser.add_argument("--out", type=Path, default=BUNDLED, help=f"output dir ({BUNDLED})")
    args = parser.parse_args(argv)
    for name, rows in build(args.seed, args.train, args.eval).items():
        write_jsonl(args.out / name, rows)
        print(f"{name}: {len(rows)} rows")


if __name__ == "__main__":
    main()
