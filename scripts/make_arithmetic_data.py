"""Generate the bundled arithmetic word-problem dataset (alpaca format).

Writes two JSON Lines files, one object per line with the keys "instruction", "input",
"output" and "answer" (in that order):

* ``mode_cli/bundled/arithmetic/train.jsonl`` (2,000 rows by default)
* ``mode_cli/bundled/arithmetic/eval.jsonl`` (200 rows by default)

Every row is a small word problem (addition, subtraction, multiplication, division with a
whole result, two-step problems, comparisons, money and time units) whose answer is a whole
non-negative integer. "output" is a one-line worked answer that always ends with
``The answer is N.`` and "answer" holds N as a string of digits, so a model's reply can be
scored by exact match.

The generator uses only the standard library and a single ``random.Random(seed)``, so the
same arguments always produce byte-identical files. Run it from the repository root::

    python scripts/make_arithmetic_data.py            # defaults: --seed 0 --train 2000 --eval 200
    python scripts/make_arithmetic_data.py --seed 1 --train 500 --eval 50 --out /tmp/arith
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from random import Random

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "mode_cli" / "bundled" / "arithmetic"

# Share of rows that put the problem in "input" under a generic instruction.
INPUT_FRACTION = 0.3

INPUT_INSTRUCTIONS = (
    "Solve the following word problem.",
    "Solve this math word problem.",
    "Answer the following arithmetic question.",
    "Work out the answer to this word problem.",
)

NAMES = (
    "Tom", "Anna", "Liam", "Maya", "Noah", "Emma", "Omar", "Priya", "Lucas", "Sofia",
    "Kenji", "Zara", "Diego", "Chloe", "Ravi", "Lena", "Sam", "Nora", "Ben", "Aisha",
    "Leo", "Mia", "Jonas", "Ines", "Kofi", "Hana", "Mateo", "Grace", "Ivan", "Lucy",
    "Tariq", "Elena", "Felix", "Amara", "Hugo", "Yuki", "Oscar", "Fatima", "Max", "Rosa",
)  # fmt: skip

# Countable things that can be bought, given, lost or shared (only plurals are needed).
OBJECTS = (
    "apples", "oranges", "pencils", "stickers", "marbles", "cookies", "books", "cards",
    "balloons", "shells", "stamps", "crayons", "muffins", "bananas", "eggs", "buttons",
    "beads", "candies", "flowers", "notebooks", "erasers", "cupcakes", "toy cars", "peaches",
)  # fmt: skip

# (singular, plural) container names.
CONTAINERS = (
    ("box", "boxes"), ("bag", "bags"), ("basket", "baskets"), ("jar", "jars"),
    ("pack", "packs"), ("crate", "crates"), ("tray", "trays"), ("bucket", "buckets"),
)  # fmt: skip

GROUPS = ("friends", "classmates", "children", "cousins", "neighbors", "teammates")

# Things with a price, for the money problems.
ITEMS = (
    "book", "hat", "toy robot", "backpack", "lamp", "puzzle", "scarf", "ball", "kite", "mug",
    "board game", "pair of socks", "plant", "water bottle", "T-shirt", "umbrella",
)  # fmt: skip

ACTIVITIES = (
    "practices piano",
    "reads",
    "jogs",
    "studies",
    "draws",
    "plays chess",
    "swims",
    "bakes",
)

BILLS = (10, 20, 50, 100)


@dataclass(frozen=True)
class Problem:
    """One generated word problem with its worked answer."""

    text: str
    output: str
    answer: int


def _ans(n: int) -> str:
    """Fixed closing sentence every output ends with; the exact-match target."""
    return f"The answer is {n}."


def _a(word: str) -> str:
    """Prefix ``word`` with the right indefinite article ("an umbrella", "a kite")."""
    return f"an {word}" if word[0].lower() in "aeiou" else f"a {word}"


def _two_names(rng: Random) -> tuple[str, str]:
    """Two distinct names, so "Tom gives 5 to Tom" never happens."""
    a, b = rng.sample(NAMES, 2)
    return a, b


def _addition(rng: Random) -> Problem:
    """a + b with several phrasings."""
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    c = a + b
    name, other = _two_names(rng)
    objs = rng.choice(OBJECTS)
    box, _ = rng.choice(CONTAINERS)
    form = rng.randrange(4)
    if form == 0:
        text = f"{name} has {a} {objs}. {name} buys {b} more. How many {objs} does {name} have now?"
        out = f"{name} starts with {a} {objs} and buys {b} more, so {a} + {b} = {c}."
    elif form == 1:
        text = f"{name} had {a} {objs} and then found {b} more. How many {objs} does {name} have in total?"
        out = f"{name} had {a} {objs} and found {b} more, so {a} + {b} = {c}."
    elif form == 2:
        text = f"There are {a} {objs} in a {box}. {name} puts in {b} more. How many {objs} are in the {box} now?"
        out = f"The {box} had {a} {objs} and gets {b} more, so {a} + {b} = {c}."
    else:
        text = f"{name} has {a} {objs} and {other} has {b} {objs}. How many {objs} do they have altogether?"
        out = f"{name} has {a} and {other} has {b}, so {a} + {b} = {c}."
    return Problem(text, f"{out} {_ans(c)}", c)


def _subtraction(rng: Random) -> Problem:
    """a - b with b < a so the result stays positive."""
    a = rng.randint(5, 99)
    b = rng.randint(2, a - 1)
    c = a - b
    name, other = _two_names(rng)
    objs = rng.choice(OBJECTS)
    box, _ = rng.choice(CONTAINERS)
    form = rng.randrange(4)
    if form == 0:
        text = f"{name} has {a} {objs} and gives {b} of them to {other}. How many {objs} does {name} have left?"
        out = f"{name} starts with {a} {objs} and gives away {b}, so {a} - {b} = {c}."
    elif form == 1:
        verb = rng.choice(("lost", "sold"))
        text = (
            f"{name} had {a} {objs} and {verb} {b} of them. How many {objs} does {name} have left?"
        )
        out = f"{name} had {a} {objs} and {verb} {b}, so {a} - {b} = {c}."
    elif form == 2:
        text = (
            f"A {box} holds {a} {objs}. {name} takes out {b}. How many {objs} remain in the {box}?"
        )
        out = f"The {box} had {a} {objs} and {b} were taken out, so {a} - {b} = {c}."
    else:
        text = (
            f"{name} needs {a} {objs} and already has {b}. How many more {objs} does {name} need?"
        )
        out = f"{name} needs {a} {objs} and has {b}, so {a} - {b} = {c}."
    return Problem(text, f"{out} {_ans(c)}", c)


def _multiplication(rng: Random) -> Problem:
    """n groups of k items."""
    n, k = rng.randint(2, 9), rng.randint(2, 30)
    c = n * k
    name, _ = _two_names(rng)
    objs = rng.choice(OBJECTS)
    box, boxes = rng.choice(CONTAINERS)
    form = rng.randrange(3)
    if form == 0:
        text = f"{name} has {n} {boxes} with {k} {objs} in each {box}. How many {objs} does {name} have in total?"
        out = f"{n} {boxes} with {k} {objs} each make {n} * {k} = {c}."
    elif form == 1:
        text = (
            f"There are {n} rows of {objs} with {k} {objs} in each row. How many {objs} are there?"
        )
        out = f"{n} rows of {k} {objs} make {n} * {k} = {c}."
    else:
        text = f"{name} buys {n} {boxes} of {objs}. Each {box} has {k} {objs}. How many {objs} does {name} buy?"
        out = f"{name} buys {n} {boxes} of {k} {objs}, so {n} * {k} = {c}."
    return Problem(text, f"{out} {_ans(c)}", c)


def _division(rng: Random) -> Problem:
    """t / n where t is built as n * q, so the quotient is always whole."""
    n = rng.randint(2, 9)
    q = rng.randint(2, 99 // n)  # keeps the dividend at most 99
    t = n * q
    name, _ = _two_names(rng)
    objs = rng.choice(OBJECTS)
    box, boxes = rng.choice(CONTAINERS)
    group = rng.choice(GROUPS)
    form = rng.randrange(3)
    if form == 0:
        text = f"{name} shares {t} {objs} equally among {n} {group}. How many {objs} does each get?"
        out = f"{t} {objs} shared among {n} {group} gives {t} / {n} = {q} each."
    elif form == 1:
        text = f"{name} packs {t} {objs} into {boxes} of {n}. How many {boxes} does {name} fill?"
        out = f"{t} {objs} in {boxes} of {n} fill {t} / {n} = {q} {boxes}."
    else:
        text = f"{t} {objs} are split evenly into {n} {boxes}. How many {objs} are in each {box}?"
        out = f"{t} {objs} split into {n} {boxes} gives {t} / {n} = {q} per {box}."
    return Problem(text, f"{out} {_ans(q)}", q)


def _two_step(rng: Random) -> Problem:
    """Two chained operations; the intermediate value is shown in the output."""
    name, other = _two_names(rng)
    objs = rng.choice(OBJECTS)
    _, boxes = rng.choice(CONTAINERS)
    form = rng.randrange(3)
    if form == 0:
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        s = a + b
        c = rng.randint(2, s - 1)
        r = s - c
        text = f"{name} has {a} {objs}, buys {b} more, then gives {c} to {other}. How many {objs} does {name} have now?"
        out = f"{name} has {a} + {b} = {s} {objs}, then gives away {c}, so {s} - {c} = {r}."
    elif form == 1:
        a = rng.randint(10, 99)
        b = rng.randint(2, a - 1)
        s = a - b
        c = rng.randint(2, 60)
        r = s + c
        text = f"{name} had {a} {objs}, lost {b}, and then found {c} more. How many {objs} does {name} have now?"
        out = f"{name} has {a} - {b} = {s} {objs}, then finds {c}, so {s} + {c} = {r}."
    else:
        n, k = rng.randint(2, 9), rng.randint(2, 12)
        s = n * k
        c = rng.randint(2, s - 1)
        r = s - c
        text = f"{name} buys {n} {boxes} of {objs} with {k} in each, then gives {c} away. How many {objs} are left?"
        out = f"{name} buys {n} * {k} = {s} {objs}, then gives away {c}, so {s} - {c} = {r}."
    return Problem(text, f"{out} {_ans(r)}", r)


def _comparison(rng: Random) -> Problem:
    """Differences between two quantities (how many more / fewer / still needed)."""
    big = rng.randint(5, 99)
    small = rng.randint(2, big - 1)
    d = big - small
    name, other = _two_names(rng)
    objs = rng.choice(OBJECTS)
    form = rng.randrange(4)
    if form == 0:
        text = f"{name} has {big} {objs} and {other} has {small} {objs}. How many more {objs} does {name} have than {other}?"
        out = f"{name} has {big} and {other} has {small}, so {big} - {small} = {d}."
    elif form == 1:
        text = f"{name} has {big} {objs}. {other} has {small} {objs}. How many fewer {objs} does {other} have than {name}?"
        out = f"{other} has {small} and {name} has {big}, so {big} - {small} = {d}."
    elif form == 2:
        # The smaller count comes first here so the model cannot just subtract in reading order.
        text = f"{name} collected {small} {objs} and {other} collected {big}. What is the difference between their counts?"
        out = f"The larger count is {big} and the smaller is {small}, so {big} - {small} = {d}."
    else:
        text = f"{name} has {small} {objs}. How many more {objs} does {name} need to have {big}?"
        out = f"{name} needs {big} and has {small}, so {big} - {small} = {d}."
    return Problem(text, f"{out} {_ans(d)}", d)


def _money(rng: Random) -> Problem:
    """Prices, change and coin values; all amounts are whole dollars or cents."""
    name, _ = _two_names(rng)
    item = rng.choice(ITEMS)
    form = rng.randrange(4)
    if form == 0:
        n, p = rng.randint(2, 9), rng.randint(2, 25)
        c = n * p
        text = f"One {item} costs {p} dollars. How many dollars do {n} of them cost?"
        out = f"Each {item} costs {p} dollars, so {n} * {p} = {c} dollars."
    elif form == 1:
        bill = rng.choice(BILLS)
        p = rng.randint(2, bill - 1)
        c = bill - p
        text = f"{name} pays for {_a(item)} that costs {p} dollars with a {bill}-dollar bill. How many dollars of change does {name} get?"
        out = (
            f"{name} pays {bill} dollars for {_a(item)} costing {p} dollars, so {bill} - {p} = {c}."
        )
    elif form == 2:
        a = rng.randint(5, 99)
        b = rng.randint(2, a - 1)
        c = a - b
        text = f"{name} has {a} dollars and spends {b} dollars on {_a(item)}. How many dollars does {name} have left?"
        out = f"{name} has {a} dollars and spends {b}, so {a} - {b} = {c} dollars."
    else:
        q, d = rng.randint(2, 9), rng.randint(2, 9)
        x, y = q * 25, d * 10
        c = x + y
        text = f"{name} has {q} quarters and {d} dimes. How many cents does {name} have?"
        out = f"{q} * 25 = {x} cents and {d} * 10 = {y} cents, so {x} + {y} = {c}."
    return Problem(text, f"{out} {_ans(c)}", c)


def _time(rng: Random) -> Problem:
    """Durations: unit conversion (hours/weeks), repeated time, totals and remainders."""
    name, _ = _two_names(rng)
    form = rng.randrange(5)
    if form == 0:
        h, m = rng.randint(1, 5), rng.randint(2, 59)
        x = h * 60
        t = x + m
        hours = "hour" if h == 1 else "hours"
        text = f"A movie lasts {h} {hours} and {m} minutes. How many minutes long is the movie?"
        out = f"{h} {hours} is {h} * 60 = {x} minutes, so {x} + {m} = {t} minutes."
    elif form == 1:
        m, d = rng.randint(5, 60), rng.randint(2, 9)
        t = d * m
        act = rng.choice(ACTIVITIES)
        text = f"{name} {act} for {m} minutes each day for {d} days. How many minutes is that in total?"
        out = f"{m} minutes a day for {d} days is {d} * {m} = {t} minutes."
    elif form == 2:
        w, d = rng.randint(1, 9), rng.randint(1, 6)
        x = w * 7
        t = x + d
        weeks = "week" if w == 1 else "weeks"
        days = "day" if d == 1 else "days"
        text = f"A trip takes {w} {weeks} and {d} {days}. How many days does the trip take?"
        out = f"{w} {weeks} is {w} * 7 = {x} days, so {x} + {d} = {t} days."
    elif form == 3:
        a, b = rng.randint(10, 90), rng.randint(10, 90)
        t = a + b
        text = f"{name} spends {a} minutes on homework and {b} minutes reading. How many minutes is that altogether?"
        out = f"{name} spends {a} and {b} minutes, so {a} + {b} = {t} minutes."
    else:
        total = rng.randint(30, 99)
        a = rng.randint(5, total - 1)
        t = total - a
        text = f"A game lasts {total} minutes. {name} has played for {a} minutes. How many minutes are left?"
        out = f"The game lasts {total} minutes and {a} have passed, so {total} - {a} = {t}."
    return Problem(text, f"{out} {_ans(t)}", t)


# Kinds are used round-robin so every kind gets an equal share before shuffling.
KINDS: tuple[Callable[[Random], Problem], ...] = (
    _addition,
    _subtraction,
    _multiplication,
    _division,
    _two_step,
    _comparison,
    _money,
    _time,
)

_EQUATION = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")
_OPS: dict[str, Callable[[int, int], int]] = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
    "/": lambda a, b: a // b,
}


def check_problem(p: Problem) -> None:
    """Raise ``ValueError`` if a generated problem is malformed or its arithmetic is wrong.

    Guards against template typos: every equation in the output must hold (division must be
    exact), and the output must end with the exact-match sentence for ``p.answer``.
    """
    if p.answer < 0:
        raise ValueError(f"negative answer: {p}")
    if not p.output.endswith(" " + _ans(p.answer)):
        raise ValueError(f"output does not end with the answer sentence: {p}")
    equations = _EQUATION.findall(p.output)
    if not equations:
        raise ValueError(f"no equation in output: {p}")
    for a, op, b, c in equations:
        x, y, z = int(a), int(b), int(c)
        if op == "/" and x % y:
            raise ValueError(f"inexact division in: {p}")
        if _OPS[op](x, y) != z:
            raise ValueError(f"wrong equation {a} {op} {b} = {c} in: {p}")
    # The last equation's result is the answer, so the worked steps lead to it.
    if int(equations[-1][3]) != p.answer:
        raise ValueError(f"last equation does not give the answer: {p}")


def generate_problems(rng: Random, n: int) -> list[Problem]:
    """Return ``n`` problems with pairwise distinct texts, kinds used round-robin."""
    seen: set[str] = set()
    problems: list[Problem] = []
    attempts = 0
    while len(problems) < n:
        attempts += 1
        if attempts > 100 * n + 1000:
            # The problem space is far larger than any sensible n; this only guards a bug.
            raise RuntimeError(f"could not find {n} distinct problems")
        p = KINDS[len(problems) % len(KINDS)](rng)
        if p.text in seen:
            continue
        check_problem(p)
        seen.add(p.text)
        problems.append(p)
    return problems


def to_rows(rng: Random, problems: list[Problem]) -> list[dict[str, str]]:
    """Turn problems into alpaca rows, putting about 30% of problems in "input".

    The count of "input" rows is fixed per split (and clamped to 1..n-1) rather than drawn
    per row, so both prompt variants are guaranteed to appear in every split of 2+ rows.
    """
    n = len(problems)
    k = round(INPUT_FRACTION * n)
    if n >= 2:
        k = min(max(k, 1), n - 1)
    with_input = set(rng.sample(range(n), k))
    rows = []
    for i, p in enumerate(problems):
        if i in with_input:
            instruction, inp = rng.choice(INPUT_INSTRUCTIONS), p.text
        else:
            instruction, inp = p.text, ""
        # Key order matters: the files document "instruction", "input", "output", "answer".
        rows.append(
            {"instruction": instruction, "input": inp, "output": p.output, "answer": str(p.answer)}
        )
    return rows


def build_splits(
    seed: int, n_train: int, n_eval: int
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Build the train and eval rows for ``seed``.

    All problems are drawn from one pool of distinct texts and then split, so no problem
    text can appear in both splits (whichever prompt variant it ends up in).
    """
    rng = Random(seed)
    problems = generate_problems(rng, n_train + n_eval)
    rng.shuffle(problems)
    train = to_rows(rng, problems[:n_train])
    eval_ = to_rows(rng, problems[n_train:])
    return train, eval_


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    """Write rows as UTF-8 JSON Lines with ``\\n`` endings on every platform."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--train", type=int, default=2000, help="train rows (default 2000)")
    parser.add_argument("--eval", type=int, default=200, help="eval rows (default 200)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output dir ({DEFAULT_OUT})")
    args = parser.parse_args(argv)
    if args.train < 0 or args.eval < 0:
        parser.error("--train and --eval must be non-negative")

    train, eval_ = build_splits(args.seed, args.train, args.eval)
    write_jsonl(args.out / "train.jsonl", train)
    write_jsonl(args.out / "eval.jsonl", eval_)
    for name, rows in (("train", train), ("eval", eval_)):
        n_input = sum(1 for r in rows if r["input"])
        print(f"{name}: {len(rows)} rows ({n_input} with input) -> {args.out / (name + '.jsonl')}")


if __name__ == "__main__":
    main()
