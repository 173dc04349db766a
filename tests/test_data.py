"""Tests of mode_cli.data: the Alpaca template, prompt masking, truncation, malformed rows,
file loading, the held-out eval split, batching, and the bundled arithmetic dataset."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest
import torch
from helpers import data_cfg, write_jsonl

from mode_cli.data import batching as batching_mod
from mode_cli.data import formats as formats_mod
from mode_cli.data import sources as sources_mod
from mode_cli.data import splits as splits_mod
from mode_cli.data import tokenizing as tokenizing_mod
from mode_cli.data.tokenizing import IGNORE, Example
from mode_cli.errors import ModeError
from mode_cli.files import BUNDLED_DIR, resolve_bundled

REPO = Path(__file__).resolve().parent.parent

NO_INPUT_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\nAdd 2 and 3.\n\n### Response:\n"
)
WITH_INPUT_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nSolve the problem.\n\n### Input:\nTom has 2 apples.\n\n### Response:\n"
)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(resolve_bundled("bundled:tiny-tokenizer")))


def good_rows(n: int, prefix: str = "q") -> list[dict]:
    return [
        {"instruction": f"What is {i} plus {i}? ({prefix})", "output": f"The answer is {2 * i}."}
        for i in range(n)
    ]


def read_all(spec: str) -> list:
    """Every row of a source, parsed, as the workers see them."""
    reader = sources_mod.Reader(sources_mod.RowSource(spec))
    return [row for chunk in reader.chunks() for row in sources_mod.rows_of(chunk, "alpaca", {})]


def ids(tokenizer, text: str, special: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


# ---------------------------------------------------------------------------- template


def test_alpaca_prompt_without_input():
    assert (
        formats_mod.alpaca_prompt({"instruction": "Add 2 and 3.", "output": "5"}) == NO_INPUT_PROMPT
    )


def test_alpaca_prompt_with_empty_input_uses_the_no_input_template():
    row = {"instruction": "Add 2 and 3.", "input": "", "output": "5"}
    assert formats_mod.alpaca_prompt(row) == NO_INPUT_PROMPT


def test_alpaca_prompt_with_input():
    row = {"instruction": "Solve the problem.", "input": "Tom has 2 apples.", "output": "2"}
    assert formats_mod.alpaca_prompt(row) == WITH_INPUT_PROMPT


# ---------------------------------------------------------------------------- tokenize


@pytest.mark.parametrize(
    ("row", "prompt"),
    [
        ({"instruction": "Add 2 and 3.", "output": "2 + 3 = 5."}, NO_INPUT_PROMPT),
        (
            {"instruction": "Solve the problem.", "input": "Tom has 2 apples.", "output": "2."},
            WITH_INPUT_PROMPT,
        ),
    ],
)
def test_tokenize_masks_the_prompt_and_trains_response_and_eos(tokenizer, row, prompt):
    prompt_ids = ids(tokenizer, prompt, True)
    response_ids = ids(tokenizer, row["output"], False) + [tokenizer.eos_token_id]

    example, cut = tokenizing_mod.tokenize(row, tokenizer, max_seq_len=1000)

    assert cut is False
    assert example.input_ids == prompt_ids + response_ids
    assert example.labels == [IGNORE] * len(prompt_ids) + response_ids
    assert example.labels[-1] == tokenizer.eos_token_id
    assert example.trained_tokens == len(response_ids)
    assert tokenizer.decode(example.input_ids[len(prompt_ids) : -1]) == row["output"]


# ---------------------------------------------------------------------------- truncation


def built(rows: list[dict], tokenizer, max_seq_len: int, tmp_path: Path):
    """The train split of these rows (a short row as the eval file): its examples and counts."""
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    held = write_jsonl(tmp_path / "eval.jsonl", [{"instruction": "Hi", "output": "Yes."}])
    cfg = data_cfg(
        train=str(train), eval=str(held), max_seq_len=max_seq_len, max_dropped_fraction=1.0
    )
    train_set, _ = splits_mod.load_splits(cfg, tokenizer)
    return list(train_set.examples), train_set.stats


def test_truncation_is_counted_and_keeps_what_fits(tokenizer, tmp_path):
    row = {"instruction": "Add 2 and 3.", "output": "2 + 3 = 5. The answer is 5."}
    n_prompt = len(ids(tokenizer, NO_INPUT_PROMPT, True))

    examples, stats = built([row], tokenizer, n_prompt + 2, tmp_path)

    assert stats.truncated == 1
    assert stats.dropped_empty == 0
    assert len(examples) == 1
    assert len(examples[0].input_ids) == n_prompt + 2
    assert examples[0].labels[:n_prompt] == [IGNORE] * n_prompt
    assert examples[0].trained_tokens == 2
    assert examples[0].labels[-1] != tokenizer.eos_token_id  # the EOS was cut too
    assert stats.tokens == n_prompt + 2
    assert stats.trained_tokens == 2


def test_untruncated_examples_are_not_counted(tokenizer, tmp_path):
    _, stats = built(good_rows(3), tokenizer, 1000, tmp_path)
    assert stats.truncated == 0
    assert stats.dropped_empty == 0


def test_example_whose_whole_response_is_cut_is_dropped_and_counted(tokenizer, tmp_path):
    short = {"instruction": "Hi.", "output": "Hello."}
    long = {"instruction": "Hi. " + "This prompt is very much longer. " * 4, "output": "Hello."}
    n_short = len(tokenizing_mod.tokenize(short, tokenizer, 10_000)[0].input_ids)
    n_long_prompt = len(ids(tokenizer, formats_mod.alpaca_prompt(long), True))
    assert n_long_prompt > n_short  # the cut falls inside the long prompt

    examples, stats = built([short, long], tokenizer, n_short, tmp_path)

    assert len(examples) == 1
    assert examples[0].input_ids == tokenizing_mod.tokenize(short, tokenizer, 10_000)[0].input_ids
    assert stats.dropped_empty == 1
    assert stats.truncated == 1


def test_response_cut_boundary(tokenizer, tmp_path):
    row = {"instruction": "Add 2 and 3.", "output": "5"}
    n_prompt = len(ids(tokenizer, NO_INPUT_PROMPT, True))

    with pytest.raises(ModeError, match=r"no example with a trained token \(1 rows, 1 lost"):
        built([row], tokenizer, n_prompt, tmp_path)

    kept, stats = built([row], tokenizer, n_prompt + 1, tmp_path)
    assert len(kept) == 1 and kept[0].trained_tokens == 1
    assert (stats.truncated, stats.dropped_empty) == (1, 0)


def test_split_with_every_response_cut_is_an_error(tokenizer, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", good_rows(4))
    cfg = data_cfg(train=str(train), eval=str(train), max_seq_len=16)

    with pytest.raises(ModeError) as err:
        splits_mod.load_splits(cfg, tokenizer)

    message = str(err.value)
    assert message.startswith("The train split has no example with a trained token (4 rows, ")
    assert "4 lost their whole response to truncation at data.max_seq_len=16" in message
    assert "raise data.max_seq_len" in message


# ---------------------------------------------------------------------------- malformed rows

BAD_ROWS = [
    pytest.param({"output": "4"}, "missing field 'instruction'", id="missing-instruction"),
    pytest.param({"instruction": "Add."}, "missing field 'output'", id="missing-output"),
    pytest.param({"instruction": "Add.", "output": "  "}, "empty 'output'", id="empty-output"),
    pytest.param({"instruction": " ", "output": "4"}, "empty 'instruction'", id="empty-instr"),
    pytest.param(
        {"instruction": 7, "output": "4"}, "field 'instruction' is not a string", id="int-instr"
    ),
    pytest.param(
        {"instruction": "Add.", "output": ["4"]}, "field 'output' is not a string", id="list-out"
    ),
    pytest.param(
        {"instruction": "Add.", "input": 3, "output": "4"},
        "field 'input' is not a string",
        id="int-input",
    ),
    pytest.param(
        ["Add.", "4"],
        "expected an object with instruction/input/output, got list",
        id="not-an-object",
    ),
]


@pytest.mark.parametrize(("bad", "problem"), BAD_ROWS)
def test_malformed_row_is_an_error_naming_its_row(tokenizer, tmp_path, bad, problem):
    rows = good_rows(2)
    rows.insert(1, bad)
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = data_cfg(train=str(train), eval=str(train))

    with pytest.raises(ModeError) as err:
        splits_mod.load_splits(cfg, tokenizer)

    assert str(err.value) == (
        f"{train}, row 2: {problem} (set data.on_bad_row=skip to drop such rows)"
    )


@pytest.mark.parametrize(("bad", "problem"), BAD_ROWS)
def test_malformed_row_is_skipped_and_counted(tokenizer, tmp_path, bad, problem):
    rows = good_rows(3)
    rows.insert(2, bad)
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    evaluation = write_jsonl(tmp_path / "eval.jsonl", good_rows(2, prefix="e"))
    cfg = data_cfg(train=str(train), eval=str(evaluation), on_bad_row="skip")

    train_set, eval_set = splits_mod.load_splits(cfg, tokenizer)

    assert train_set.stats.skipped == [f"{train}, row 3: {problem}"]
    assert train_set.stats.rows == 3
    assert len(train_set.examples) == 3
    assert eval_set.stats.skipped == []
    assert len(eval_set.examples) == 2


def test_malformed_eval_row_is_reported_against_the_eval_file(tokenizer, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", good_rows(2))
    evaluation = write_jsonl(tmp_path / "eval.jsonl", [*good_rows(1), {"instruction": "x"}])
    cfg = data_cfg(train=str(train), eval=str(evaluation))

    with pytest.raises(ModeError, match=r"eval\.jsonl, row 2: missing field 'output'"):
        splits_mod.load_splits(cfg, tokenizer)


def jsonl_with_bad_line(path: Path) -> Path:
    lines = [json.dumps(row) for row in good_rows(3)]
    lines.insert(2, '{"instruction": "Add.", "output": ')
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_bad_json_line_is_an_error_naming_the_line(tokenizer, tmp_path):
    train = jsonl_with_bad_line(tmp_path / "train.jsonl")
    cfg = data_cfg(train=str(train), eval=str(train))

    with pytest.raises(ModeError) as err:
        splits_mod.load_splits(cfg, tokenizer)

    assert str(err.value).startswith(f"{train}, line 3: not valid JSON (")


def test_bad_json_line_is_skipped_with_on_bad_row_skip(tokenizer, tmp_path):
    train = jsonl_with_bad_line(tmp_path / "train.jsonl")
    evaluation = write_jsonl(tmp_path / "eval.jsonl", good_rows(2, prefix="e"))
    cfg = data_cfg(train=str(train), eval=str(evaluation), on_bad_row="skip")

    train_set, _ = splits_mod.load_splits(cfg, tokenizer)

    assert len(train_set.examples) == 3
    assert len(train_set.stats.skipped) == 1
    assert "line 3" in train_set.stats.skipped[0]


def test_non_list_json_file_is_an_error(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps({"instruction": "a", "output": "b"}), encoding="utf-8")
    with pytest.raises(ModeError, match=r"rows\.json: expected a JSON list of objects"):
        read_all(str(path))


def test_invalid_json_file_is_an_error(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text('[{"instruction": "a", ', encoding="utf-8")
    with pytest.raises(ModeError, match=r"rows\.json: not valid JSON"):
        read_all(str(path))


# ---------------------------------------------------------------------------- loading


def test_json_list_and_jsonl_load_the_same_rows(tokenizer, tmp_path):
    rows = good_rows(5)
    as_json = tmp_path / "rows.json"
    as_json.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    as_jsonl = write_jsonl(tmp_path / "rows.jsonl", rows)
    # Blank lines in JSON lines are ignored.
    as_jsonl.write_text(as_jsonl.read_text(encoding="utf-8") + "\n\n", encoding="utf-8")

    assert read_all(str(as_json)) == rows
    assert read_all(str(as_jsonl)) == rows

    splits = [
        splits_mod.load_splits(data_cfg(train=str(path), eval=str(path)), tokenizer)
        for path in (as_json, as_jsonl)
    ]
    assert [e.input_ids for e in splits[0][0].examples] == [
        e.input_ids for e in splits[1][0].examples
    ]
    assert len(splits[0][0].examples) == 5


def test_bundled_source_loads():
    rows = read_all("bundled:arithmetic/eval.jsonl")
    assert len(rows) == 200


@pytest.mark.parametrize("name", ["missing.jsonl", "missing.json"])
def test_missing_file_is_an_error(tokenizer, tmp_path, name):
    missing = tmp_path / name
    with pytest.raises(ModeError, match="Data file not found"):
        read_all(str(missing))
    train = write_jsonl(tmp_path / "train.jsonl", good_rows(2))
    with pytest.raises(ModeError, match=f"Data file not found: {missing}"):
        splits_mod.load_splits(data_cfg(train=str(train), eval=str(missing)), tokenizer)


def test_missing_bundled_resource_is_an_error():
    with pytest.raises(ModeError, match="No bundled resource 'bundled:nope.jsonl'"):
        read_all("bundled:nope.jsonl")


def test_max_examples_cap_each_split(tokenizer, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", good_rows(10))
    cfg = data_cfg(train=str(train), eval=str(train), max_train_examples=4, max_eval_examples=3)
    train_set, eval_set = splits_mod.load_splits(cfg, tokenizer)
    assert (len(train_set.examples), len(eval_set.examples)) == (4, 3)
    assert (train_set.stats.rows, eval_set.stats.rows) == (4, 3)


# ---------------------------------------------------------------------------- held-out eval


def held_out(tokenizer, path: Path, seed: int) -> tuple[set, set]:
    cfg = data_cfg(train=str(path), eval=None, eval_fraction=0.25, seed=seed)
    train_set, eval_set = splits_mod.load_splits(cfg, tokenizer)
    return (
        {tuple(e.input_ids) for e in train_set.examples},
        {tuple(e.input_ids) for e in eval_set.examples},
    )


def test_held_out_eval_is_deterministic_and_disjoint(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", good_rows(20))
    every = {tuple(tokenizing_mod.tokenize(r, tokenizer, 512)[0].input_ids) for r in good_rows(20)}

    train_a, eval_a = held_out(tokenizer, path, seed=0)
    train_b, eval_b = held_out(tokenizer, path, seed=0)
    train_c, eval_c = held_out(tokenizer, path, seed=1)

    assert (len(train_a), len(eval_a)) == (15, 5)
    assert train_a.isdisjoint(eval_a)
    assert train_a | eval_a == every
    assert (train_a, eval_a) == (train_b, eval_b)
    assert train_c.isdisjoint(eval_c) and train_c | eval_c == every
    assert eval_c != eval_a  # the seed chooses the rows


# ---------------------------------------------------------------------------- batching


def test_collate_right_pads_and_masks():
    a = Example(input_ids=[11, 12, 13], labels=[IGNORE, 12, 13])
    b = Example(input_ids=[21, 22, 23, 24, 25], labels=[IGNORE, IGNORE, 23, 24, 25])

    batch = batching_mod.collate([a, b], pad_id=7)

    assert batch["input_ids"].tolist() == [[11, 12, 13, 7, 7], [21, 22, 23, 24, 25]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [
        [IGNORE, 12, 13, IGNORE, IGNORE],
        [IGNORE, IGNORE, 23, 24, 25],
    ]
    assert all(t.dtype == torch.long for t in batch.values())
    assert batching_mod.target_count(batch) == 5


def test_target_count_skips_the_first_position():
    # A label at position 0 is never predicted (nothing precedes it).
    batch = batching_mod.collate([Example(input_ids=[5, 6, 7], labels=[5, 6, IGNORE])], pad_id=0)
    assert batching_mod.target_count(batch) == 1
    batch = batching_mod.collate([Example(input_ids=[5, 6], labels=[IGNORE, IGNORE])], pad_id=0)
    assert batching_mod.target_count(batch) == 0


def test_epoch_order_covers_every_example_once_in_a_seeded_order():
    def order(seed, epoch):
        return batching_mod.epoch_order(10, seed, epoch).tolist()

    assert sorted(order(0, 0)) == list(range(10))
    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1)
    # The permutation a seeded shuffle of any 10 items gives.
    items = list(range(10))
    random.Random(0 * 100_003 + 1).shuffle(items)
    assert order(0, 1) == items


# ---------------------------------------------------------------------------- bundled dataset


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_bundled_arithmetic_dataset():
    train = read_jsonl(BUNDLED_DIR / "arithmetic" / "train.jsonl")
    evaluation = read_jsonl(BUNDLED_DIR / "arithmetic" / "eval.jsonl")

    assert (len(train), len(evaluation)) == (2000, 200)
    for row in train + evaluation:
        assert list(row) == ["instruction", "input", "output", "answer"]
        assert formats_mod.row_problem(row) is None
        assert row["answer"].isdigit()
        assert row["output"].endswith(f"The answer is {row['answer']}.")

    def problems(rows):
        return {row["input"] or row["instruction"] for row in rows}

    assert len(problems(train)) == 2000 and len(problems(evaluation)) == 200
    assert problems(train).isdisjoint(problems(evaluation))
    # Both prompt variants appear in both splits.
    for rows in (train, evaluation):
        assert any(row["input"] for row in rows) and any(not row["input"] for row in rows)


def test_make_arithmetic_data_regenerates_the_bundled_files(tmp_path, capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location(
        "make_arithmetic_data", REPO / "scripts" / "make_arithmetic_data.py"
    )
    script = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "make_arithmetic_data", script)  # for its dataclasses
    spec.loader.exec_module(script)

    script.main(["--out", str(tmp_path)])

    for name in ("train.jsonl", "eval.jsonl"):
        assert (tmp_path / name).read_bytes() == (BUNDLED_DIR / "arithmetic" / name).read_bytes()
    assert "train: 2000 rows" in capsys.readouterr().out
