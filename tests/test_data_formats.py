"""Tests of the data formats (alpaca, chat, text), field mapping, prompts, dataset mixing and the
accounting of examples that truncation leaves with no trained token."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from helpers import data_cfg, train_tiny, write_jsonl
from omegaconf import OmegaConf

from mode_cli.data import formats as formats_mod
from mode_cli.data import selection as selection_mod
from mode_cli.data import sources as sources_mod
from mode_cli.data import splits as splits_mod
from mode_cli.data import store as store_mod
from mode_cli.data import tokenizing as tokenizing_mod
from mode_cli.data.formats import CHATML_TEMPLATE
from mode_cli.data.splits import DataStats
from mode_cli.data.tokenizing import IGNORE
from mode_cli.errors import ModeError
from mode_cli.files import BUNDLED_DIR, resolve_bundled

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(resolve_bundled("bundled:tiny-tokenizer")))


def chat(i: int, turns: int = 1, system: bool = False) -> dict:
    messages = [{"role": "system", "content": "Be brief."}] if system else []
    for t in range(turns):
        messages.append({"role": "user", "content": f"What is {i} plus {t}?"})
        messages.append({"role": "assistant", "content": f"It is {i + t}."})
    return {"messages": messages, "answer": str(i + turns - 1)}


def trained_spans(tokenizer, example) -> list[str]:
    """The decoded runs of consecutive trained tokens."""
    spans, run = [], []
    for token, label in zip(example.input_ids, example.labels, strict=True):
        if label != IGNORE:
            assert label == token
            run.append(token)
        elif run:
            spans.append(tokenizer.decode(run))
            run = []
    if run:
        spans.append(tokenizer.decode(run))
    return spans


# ---------------------------------------------------------------------------- chat


def test_chat_trains_exactly_the_assistant_turns(tokenizer):
    row = chat(3, turns=2, system=True)
    example, cut = tokenizing_mod.tokenize_chat(row["messages"], tokenizer, 10_000, CHATML_TEMPLATE)

    text = tokenizer.apply_chat_template(
        row["messages"], chat_template=CHATML_TEMPLATE, tokenize=False
    )
    assert cut is False
    assert tokenizer.decode(example.input_ids) == text
    assert trained_spans(tokenizer, example) == ["It is 3.<|im_end|>\n", "It is 4.<|im_end|>\n"]


def test_chat_labels_match_a_character_offset_reference(tokenizer):
    """Naive reference: label every token overlapping an assistant turn's characters."""
    messages = chat(7, turns=3, system=True)["messages"]
    example, _ = tokenizing_mod.tokenize_chat(messages, tokenizer, 10_000, CHATML_TEMPLATE)

    def render(msgs, gen):
        return tokenizer.apply_chat_template(
            msgs, chat_template=CHATML_TEMPLATE, tokenize=False, add_generation_prompt=gen
        )

    text = render(messages, False)
    spans = [
        (len(render(messages[:i], True)), len(render(messages[: i + 1], False)))
        for i, m in enumerate(messages)
        if m["role"] == "assistant"
    ]
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    expected = [
        token if any(a < end and b > start for start, end in spans) else IGNORE
        for token, (a, b) in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True)
    ]
    assert example.labels == expected


def test_chat_falls_back_to_offsets_when_tokens_merge_across_the_turn(tokenizer):
    # The generation prompt ends in a space that the byte-level tokenizer merges with the
    # reply's first word: the prompt's tokens are not a prefix of the conversation's.
    template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "There 4."}]
    prompt = tokenizer("user: Hi\nassistant: ", add_special_tokens=False)["input_ids"]
    whole = tokenizer("user: Hi\nassistant: There 4.\n", add_special_tokens=False)["input_ids"]
    assert whole[: len(prompt)] != prompt

    example, _ = tokenizing_mod.tokenize_chat(messages, tokenizer, 10_000, template)

    assert trained_spans(tokenizer, example) == [" There 4.\n"]


def test_chat_template_that_refuses_a_conversation_names_the_row(tokenizer, tmp_path):
    strict = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('start with a user turn') }}"
        "{% endif %}" + CHATML_TEMPLATE
    )
    path = write_jsonl(tmp_path / "chat.jsonl", [chat(0), chat(1, system=True)])
    cfg = data_cfg(train=str(path), eval=str(path), format="chat", chat_template=strict)
    with pytest.raises(ModeError) as err:
        splits_mod.load_splits(cfg, tokenizer)
    assert str(err.value) == (
        f"{path}, row 2: the chat template refused this conversation: start with a user turn"
    )


def test_chat_template_choice(tokenizer):
    assert (
        formats_mod.chat_template(data_cfg(), tokenizer) == CHATML_TEMPLATE
    )  # the tokenizer has none
    assert formats_mod.chat_template(data_cfg(chat_template="chatml"), tokenizer) == CHATML_TEMPLATE
    own = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert formats_mod.chat_template(data_cfg(chat_template=own), tokenizer) == own

    class WithTemplate:
        chat_template = "{{ 'x' }}"

    assert formats_mod.chat_template(data_cfg(), WithTemplate()) == "{{ 'x' }}"
    assert (
        formats_mod.chat_template(data_cfg(chat_template="chatml"), WithTemplate())
        == CHATML_TEMPLATE
    )


def test_chat_field_mapping_reads_sharegpt_files(tokenizer, tmp_path):
    """ShareGPT rows: `from`/`value` keys and the role names human/gpt."""
    plain = [chat(i, turns=2) for i in range(4)]
    sharegpt = {"user": "human", "assistant": "gpt", "system": "system"}
    renamed = [
        {
            "conversation": [
                {"from": sharegpt[m["role"]], "value": m["content"]} for m in row["messages"]
            ],
            "answer": row["answer"],
        }
        for row in plain
    ]
    assert any(m["from"] == "gpt" for m in renamed[0]["conversation"])
    a = write_jsonl(tmp_path / "a.jsonl", plain)
    b = write_jsonl(tmp_path / "b.jsonl", renamed)
    fields = {"messages": "conversation", "role": "from", "content": "value"}

    train_a, _ = splits_mod.load_splits(
        data_cfg(train=str(a), eval=str(a), format="chat"), tokenizer
    )
    cfg_b = data_cfg(train=str(b), eval=str(b), format="chat", fields=fields)
    train_b, _ = splits_mod.load_splits(cfg_b, tokenizer)

    assert [e.input_ids for e in train_a.examples] == [e.input_ids for e in train_b.examples]
    assert [e.labels for e in train_a.examples] == [e.labels for e in train_b.examples]
    rows = splits_mod.eval_rows(cfg_b)
    assert rows[0]["messages"] == plain[0]["messages"] and rows[0]["answer"] == plain[0]["answer"]


BAD_CHATS = [
    pytest.param({"text": "hi"}, "missing field 'messages'", id="no-messages"),
    pytest.param({"messages": []}, "field 'messages' is not a non-empty list", id="empty"),
    pytest.param({"messages": "hi"}, "field 'messages' is not a non-empty list", id="a-string"),
    pytest.param(
        {"messages": [{"role": "user", "content": "Hi"}]},
        "no assistant turn (nothing to train on)",
        id="no-assistant",
    ),
    pytest.param(
        {"messages": [{"role": "robot", "content": "Hi"}, {"role": "assistant", "content": "x"}]},
        "message 1: unknown role 'robot' (expected system, user, assistant, human, gpt, model)",
        id="unknown-role",
    ),
    pytest.param(
        {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]},
        "message 1: 'content' is missing or not a string",
        id="int-content",
    ),
    pytest.param(
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " "}]},
        "message 2: empty assistant content",
        id="empty-reply",
    ),
    pytest.param(
        {"messages": [{"content": "Hi"}, {"role": "assistant", "content": "x"}]},
        "message 1 has no 'role'",
        id="no-role",
    ),
    pytest.param({"messages": ["Hi", "x"]}, "message 1 is not an object with role/content"),
]


@pytest.mark.parametrize(("bad", "problem"), BAD_CHATS)
def test_malformed_chat_row_is_an_error_naming_its_row(tokenizer, tmp_path, bad, problem):
    train = write_jsonl(tmp_path / "train.jsonl", [chat(0), bad, chat(1)])

    with pytest.raises(ModeError) as err:
        splits_mod.load_splits(
            data_cfg(train=str(train), eval=str(train), format="chat"), tokenizer
        )

    assert str(err.value) == (
        f"{train}, row 2: {problem} (set data.on_bad_row=skip to drop such rows)"
    )


def test_malformed_chat_row_is_skipped_and_counted(tokenizer, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [chat(0), BAD_CHATS[3].values[0], chat(1)])
    cfg = data_cfg(train=str(train), eval=str(train), format="chat", on_bad_row="skip")

    train_set, _ = splits_mod.load_splits(cfg, tokenizer)

    assert train_set.stats.skipped == [f"{train}, row 2: no assistant turn (nothing to train on)"]
    assert len(train_set.examples) == 2


def test_mapped_field_missing_names_the_column_and_the_mapping(tokenizer, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"question": "Add 2 and 3.", "reply": "5"}])
    cfg = data_cfg(
        train=str(train), eval=str(train), fields={"instruction": "question", "output": "answer"}
    )
    with pytest.raises(ModeError, match=r"row 1: missing field 'answer' \(data\.fields\.output\)"):
        splits_mod.load_splits(cfg, tokenizer)


def test_alpaca_field_mapping_gives_the_same_examples(tokenizer, tmp_path):
    rows = [{"instruction": f"Add {i} and 1.", "output": f"{i + 1}."} for i in range(5)]
    renamed = [{"question": r["instruction"], "solution": r["output"]} for r in rows]
    a = write_jsonl(tmp_path / "a.jsonl", rows)
    b = write_jsonl(tmp_path / "b.jsonl", renamed)
    fields = {"instruction": "question", "output": "solution"}

    train_a, _ = splits_mod.load_splits(data_cfg(train=str(a), eval=str(a)), tokenizer)
    train_b, _ = splits_mod.load_splits(
        data_cfg(train=str(b), eval=str(b), fields=fields), tokenizer
    )

    assert [e.input_ids for e in train_a.examples] == [e.input_ids for e in train_b.examples]
    assert [e.labels for e in train_a.examples] == [e.labels for e in train_b.examples]


# ---------------------------------------------------------------------------- prompts


def test_user_prompt_per_format(tokenizer):
    assert formats_mod.user_prompt(
        "Add 2 and 3.", data_cfg(), tokenizer
    ) == formats_mod.ALPACA_NO_INPUT.format(instruction="Add 2 and 3.")
    assert formats_mod.user_prompt("Add.", data_cfg(format="chat"), tokenizer) == (
        "<|im_start|>user\nAdd.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert formats_mod.user_prompt("Once upon", data_cfg(format="text"), tokenizer) == "Once upon"


def test_row_prompt_is_everything_before_the_trained_response(tokenizer, tmp_path):
    rows = [chat(i, turns=2, system=i % 2 == 0) for i in range(3)]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    cfg = data_cfg(train=str(path), eval=str(path), format="chat")
    _, eval_set = splits_mod.load_splits(cfg, tokenizer)

    for row, example in zip(splits_mod.eval_rows(cfg), eval_set.examples, strict=True):
        prompt = formats_mod.row_prompt(row, cfg, tokenizer)
        assert prompt.endswith("<|im_start|>assistant\n")
        n = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        assert example.input_ids[:n] == tokenizer(prompt, add_special_tokens=False)["input_ids"]
        last_reply = max(i for i, label in enumerate(example.labels[:n]) if label != IGNORE)
        assert last_reply < n and all(label != IGNORE for label in example.labels[n:])

    alpaca = {"instruction": "Add 2 and 3.", "output": "5"}
    assert formats_mod.row_prompt(alpaca, data_cfg(), tokenizer) == formats_mod.alpaca_prompt(
        alpaca
    )
    with pytest.raises(ModeError, match="format=text has no prompt/response split"):
        formats_mod.row_prompt({"text": "x"}, data_cfg(format="text"), tokenizer)


# ---------------------------------------------------------------------------- text


def test_text_trains_every_token_and_splits_long_documents(tokenizer):
    text = "Problem: Tom has 3 apples and buys 4 more. " * 6
    ids = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    assert len(ids) > 40

    chunks = tokenizing_mod.tokenize_text(text, tokenizer, 16)

    assert all(len(c.input_ids) <= 16 and c.labels == c.input_ids for c in chunks)
    # Chunks overlap by one token: every token but the very first is predicted exactly once.
    rebuilt = chunks[0].input_ids + [t for c in chunks[1:] for t in c.input_ids[1:]]
    assert rebuilt == ids
    assert sum(tokenizing_mod.predicted(c) for c in chunks) == len(ids) - 1
    assert chunks[-1].input_ids[-1] == tokenizer.eos_token_id
    assert tokenizing_mod.tokenize_text("Hi.", tokenizer, 16)[0].input_ids == (
        tokenizer("Hi.")["input_ids"] + [tokenizer.eos_token_id]
    )


def test_text_split_stats(tokenizer, tmp_path):
    rows = [{"body": "Short one."}, {"body": "A much longer page of text. " * 8}]
    path = write_jsonl(tmp_path / "text.jsonl", rows)
    cfg = data_cfg(
        train=str(path), eval=str(path), format="text", fields={"text": "body"}, max_seq_len=32
    )
    train_set, _ = splits_mod.load_splits(cfg, tokenizer)
    stats = train_set.stats
    assert (stats.rows, stats.chunked, stats.truncated, stats.dropped_empty) == (2, 1, 0, 0)
    assert stats.examples == len(train_set.examples) > 2
    assert stats.trained_tokens == stats.tokens - stats.examples


# ---------------------------------------------------------------------------- zero trained tokens


def long_prompt_chat(i: int) -> dict:
    question = f"Question {i}: " + "tell me a long story about numbers. " * 6
    return {
        "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": "4"}]
    }


def test_chat_split_whose_replies_are_all_cut_is_an_error(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [long_prompt_chat(i) for i in range(3)])
    cfg = data_cfg(train=str(path), eval=str(path), format="chat", max_seq_len=96)
    for fraction in (0.5, 1.0):  # losing every example fails whatever the threshold
        cfg.max_dropped_fraction = fraction
        with pytest.raises(ModeError) as err:
            splits_mod.load_splits(cfg, tokenizer)
        assert str(err.value) == (
            "The train split has no example with a trained token (3 rows, 3 lost their whole "
            "response to truncation at data.max_seq_len=96): raise data.max_seq_len or check "
            "the data"
        )


def test_dropped_fraction_above_the_threshold_is_an_error(tokenizer, tmp_path):
    rows = [long_prompt_chat(0), long_prompt_chat(1), chat(0), chat(1)]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    cfg = data_cfg(
        train=str(path), eval=str(path), format="chat", max_seq_len=96, max_dropped_fraction=0.4
    )
    with pytest.raises(ModeError) as err:
        splits_mod.load_splits(cfg, tokenizer)
    assert str(err.value).startswith(
        "2 of 4 train examples (50%) lost their whole response to truncation at "
        "data.max_seq_len=96, more than data.max_dropped_fraction=0.4"
    )


def test_dropped_examples_below_the_threshold_are_counted_and_reported(tokenizer, tmp_path, capsys):
    rows = [long_prompt_chat(0), chat(0), chat(1), chat(2)]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    cfg = data_cfg(train=str(path), eval=str(path), format="chat", max_seq_len=96)

    train_set, eval_set = splits_mod.load_splits(cfg, tokenizer)

    for split in (train_set, eval_set):
        assert (split.stats.rows, split.stats.examples, split.stats.dropped_empty) == (4, 3, 1)
        assert len(split.examples) == 3
    err = capsys.readouterr().err
    assert "1 of 4 train examples lost their whole response to truncation at" in err
    assert "1 of 4 eval examples" in err
    assert "1 dropped with no response left" in train_set.stats.describe(96)


# ---------------------------------------------------------------------------- mixing


def test_mix_counts_follow_the_weights():
    assert selection_mod.mix_counts([100, 100], [2.0, 1.0], 200) == [133, 67]
    assert selection_mod.mix_counts([10, 10, 10], [1, 1, 1], 10) == [4, 3, 3]
    assert sum(selection_mod.mix_counts([5, 7], [0.3, 0.7], 11)) == 11


def mixed_cfg(tmp_path, **values):
    alpaca = write_jsonl(
        tmp_path / "alpaca.jsonl",
        [
            {"instruction": f"Add {i} and 1.", "output": f"{i + 1}.", "answer": str(i + 1)}
            for i in range(10)
        ],
    )
    conversations = [
        {"talk": row["messages"], "answer": row["answer"]} for row in map(chat, range(4))
    ]
    chats = write_jsonl(tmp_path / "chat.jsonl", conversations)
    mix = [
        {"train": str(alpaca), "weight": 3.0},
        {"train": str(chats), "weight": 1.0, "format": "chat", "fields": {"messages": "talk"}},
    ]
    return data_cfg(mix=mix, eval_fraction=0.25, **values), str(alpaca), str(chats)


def formats_of(selection, rows) -> list[str]:
    return [selection.sources[s].format for s in rows.source]


def test_mix_draws_by_weight_repeats_small_sources_and_is_seeded(tokenizer, tmp_path):
    cfg, alpaca, chats = mixed_cfg(tmp_path, max_train_examples=16)

    selection = splits_mod.select_rows(cfg)

    # 10 alpaca rows minus 2 held out, 4 chat rows minus 1: 12 and 4 chat draws of 3 rows.
    assert selection.train_sources == {alpaca: 12, chats: 4}
    assert selection.repeated == 4 + 1
    assert sorted(formats_of(selection, selection.train)) == ["alpaca"] * 12 + ["chat"] * 4
    rows = [dict(r) for r in splits_mod.rows_in_order(selection, selection.train)]
    again = splits_mod.select_rows(cfg)
    assert [dict(r) for r in splits_mod.rows_in_order(again, again.train)] == rows
    cfg.seed = 1
    other = splits_mod.select_rows(cfg)
    assert [dict(r) for r in splits_mod.rows_in_order(other, other.train)] != rows

    train_set, eval_set = splits_mod.load_splits(data_cfg(**OmegaConf.to_container(cfg)), tokenizer)
    assert train_set.stats.rows == 16 and len(train_set.examples) == 16
    assert train_set.stats.sources == {alpaca: 12, chats: 4}
    assert "rows per source" in train_set.stats.describe(512)


def test_mix_default_size_and_eval_split(tokenizer, tmp_path):
    cfg, alpaca, chats = mixed_cfg(tmp_path)
    selection = splits_mod.select_rows(cfg)
    assert len(selection.train) == 8 + 3  # the sources' training rows together
    # Held-out rows of each source, interleaved.
    assert formats_of(selection, selection.eval) == ["alpaca", "chat", "alpaca"]

    _, eval_set = splits_mod.load_splits(cfg, tokenizer)
    rows = splits_mod.eval_rows(cfg)
    assert [r.format for r in rows] == ["alpaca", "chat", "alpaca"]
    for row, example in zip(rows, eval_set.examples, strict=True):
        prompt = formats_mod.row_prompt(row, cfg, tokenizer)
        prompt_ids = tokenizer(prompt, add_special_tokens=row.format == "alpaca")["input_ids"]
        assert example.input_ids[: len(prompt_ids)] == prompt_ids
        assert row["answer"]


def test_mix_with_one_eval_source(tokenizer, tmp_path):
    cfg, alpaca, _ = mixed_cfg(tmp_path)
    cfg.eval = alpaca
    selection = splits_mod.select_rows(cfg)
    assert len(selection.eval) == 10 and set(formats_of(selection, selection.eval)) == {"alpaca"}
    assert len(selection.train) == 10 + 4  # nothing held out


# ---------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        (["data.format=yaml"], "data.format='yaml': expected one of alpaca, chat, text"),
        (
            ["data.fields.text=body"],
            "data.fields: text is not a field of format alpaca (its fields: instruction, "
            "input, output)",
        ),
        (
            ["data.mix=[{train: a.jsonl, weight: 0}]"],
            "data.train and data.mix are both set: use one",
        ),
        (
            ["data.mix=[{train: a.jsonl, weight: 0}]"],
            "data.mix[0].weight=0.0: expected a number > 0",
        ),
        (
            ["data.mix=[{train: a.jsonl, format: csv}]"],
            "data.mix[0].format='csv': expected one of alpaca, chat, text",
        ),
        (["data.max_dropped_fraction=1.5"], "data.max_dropped_fraction=1.5: expected a number"),
    ],
)
def test_invalid_data_config_is_reported(mode, overrides, problem):
    code, _, err = mode("train", "--dry-run", "recipe=tiny-llama-alpaca", *overrides)
    assert code == 2
    assert problem in " ".join(err.split())


def test_fields_from_the_shell(mode, tmp_path):
    rows = [{"question": f"Add {i} and 1.", "solution": f"{i + 1}."} for i in range(4)]
    path = write_jsonl(tmp_path / "q.jsonl", rows)
    code, _, err = mode(
        "train",
        "--dry-run",
        "recipe=tiny-llama-alpaca",
        f"data.train={path}",
        f"data.eval={path}",
        "data.fields.instruction=question",
        "data.fields.output=solution",
    )
    assert code == 0, err
    assert "train: 4 examples from 4 rows" in " ".join(err.split())


def checked_rows(spec: str, format: str) -> list:
    """Every row of a source, which must all be well-formed, under the format's names."""
    source = sources_mod.RowSource(spec, format=format)
    scan = store_mod.scan_source(sources_mod.Reader(source), "error", False, 1)
    assert scan.count == scan.rows
    return sources_mod.read_rows(source, scan.numbers)


def test_bundled_samples_regenerate_and_are_well_formed(tmp_path, capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location(
        "make_format_samples", REPO / "scripts" / "make_format_samples.py"
    )
    script = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "make_format_samples", script)
    spec.loader.exec_module(script)

    script.main(["--out", str(tmp_path)])

    for name in ("chat/train.jsonl", "chat/eval.jsonl", "text/train.jsonl", "text/eval.jsonl"):
        assert (tmp_path / name).read_bytes() == (BUNDLED_DIR / name).read_bytes()
    for split, n in (("train", 120), ("eval", 24)):
        good = checked_rows(f"bundled:chat/{split}.jsonl", "chat")
        assert len(good) == n
        assert all(
            r["messages"][-1]["content"].endswith(f"The answer is {r['answer']}.") for r in good
        )
        assert len(checked_rows(f"bundled:text/{split}.jsonl", "text")) == n
    questions = {
        m["content"]
        for split in ("train", "eval")
        for r in checked_rows(f"bundled:chat/{split}.jsonl", "chat")
        for m in r["messages"]
        if m["role"] == "user"
    }
    assert len(questions) == 120 + 40 + 24 + 8  # every question distinct, across the splits


# ---------------------------------------------------------------------------- end to end


def test_chat_recipe_trains(mode, tmp_path):
    out = tmp_path / "chat"
    train_tiny(
        mode,
        out,
        "data=chat-sample",
        "data.max_train_examples=8",
        "data.max_eval_examples=4",
        "train.max_steps=2",
        "eval.compare_base=false",
    )
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(r["target_tokens"] > 0 for r in records)
    assert list(out.glob("**/report.json"))  # the eval report ran on the chat eval split


def test_all_responses_cut_fails_before_anything_is_written(mode, tmp_path):
    out = tmp_path / "cut"
    code, _, err = mode(
        "train", "recipe=tiny-llama-alpaca", f"output_dir={out}", "data.max_seq_len=16"
    )
    assert code == 2
    assert "lost their whole response to truncation at data.max_seq_len=16" in " ".join(err.split())
    assert not out.exists()


def test_data_stats_describe():
    stats = DataStats(rows=4, examples=6, chunked=2, tokens=300, trained_tokens=290, packed=3)
    line = stats.describe(128)
    assert "6 examples from 4 rows" in line
    assert "2 long texts split into chunks" in line
    assert "packed into 3 sequences (78% full)" in line
