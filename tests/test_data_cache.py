"""Data at scale: the optimised path (chunks, worker processes, memory-mapped tokens, index
arrays) against the naive list-based reference; the tokenized cache's keys, hits and atomic
writes; Parquet, CSV and streamed hub sources; exact deduplication; bad rows deep in a file."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import reference_data
from helpers import data_cfg, records, run_command, train_tiny, write_jsonl
from omegaconf import OmegaConf

from mode_cli.data import cache as cache_mod
from mode_cli.data import splits as splits_mod
from mode_cli.data import store as store_mod
from mode_cli.data.formats import CHATML_TEMPLATE
from mode_cli.errors import ModeError
from mode_cli.files import resolve_bundled


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(resolve_bundled("bundled:tiny-tokenizer")))


@pytest.fixture
def data_cache(tmp_path, monkeypatch) -> Path:
    """A data cache of the test's own, empty."""
    folder = tmp_path / "data-cache"
    monkeypatch.setenv("MODE_DATA_CACHE", str(folder))
    return folder


def alpaca_rows(n: int, start: int = 0) -> list[dict]:
    return [
        {
            "instruction": f"What is {i} plus {i % 7}?",
            "output": f"{i} + {i % 7} = {i + i % 7}. The answer is {i + i % 7}.",
            "answer": str(i + i % 7),
        }
        for i in range(start, start + n)
    ]


def entries(kind: str) -> list[Path]:
    return [e.path for e in cache_mod.list_entries() if e.kind == kind]


def assert_matches_reference(cfg, tokenizer) -> tuple:
    """load_splits gives exactly the reference's examples and counts; returns the splits."""
    train, evaluation = splits_mod.load_splits(cfg, tokenizer)
    want_train, train_counts, want_eval, eval_counts = reference_data.splits(cfg, tokenizer)
    assert list(train.examples) == want_train
    assert list(evaluation.examples) == want_eval
    for split, counts in ((train, train_counts), (evaluation, eval_counts)):
        got = {name: getattr(split.stats, name) for name in counts}
        assert got == counts
    return train, evaluation


# ---------------------------------------------------------------------------- parity


def mix_files(tmp_path) -> tuple[str, str]:
    chats = [json.loads(line) for line in resolve_bundled("bundled:chat/train.jsonl").open()]
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", alpaca_rows(30) + alpaca_rows(5))  # repeats
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"talk": c["messages"]} for c in chats[:12]])
    return str(alpaca), str(chat)


PARITY = {
    "alpaca held out": {
        "train": "bundled:arithmetic/train.jsonl",
        "eval": None,
        "eval_fraction": 0.05,
        "max_seq_len": 56,  # cuts some responses short and some whole
        "max_dropped_fraction": 1.0,
    },
    "alpaca eval file and caps": {
        "train": "bundled:arithmetic/train.jsonl",
        "eval": "bundled:arithmetic/eval.jsonl",
        "max_train_examples": 300,
        "max_eval_examples": 30,
    },
    "chat": {"train": "bundled:chat/train.jsonl", "eval": None, "format": "chat"},
    "text packed": {
        "train": "bundled:text/train.jsonl",
        "eval": "bundled:text/eval.jsonl",
        "format": "text",
        "max_seq_len": 96,  # long pages split into chunks
        "packing": True,
        "seed": 3,
    },
    "alpaca deduplicated": {"file": "alpaca", "eval": None, "eval_fraction": 0.2, "dedup": "exact"},
}


@pytest.mark.parametrize("name", list(PARITY))
def test_splits_match_the_naive_reference(tokenizer, tmp_path, name):
    values = dict(PARITY[name])
    if values.pop("file", None):
        values["train"] = mix_files(tmp_path)[0]
    assert_matches_reference(data_cfg(**values), tokenizer)


@pytest.mark.parametrize("dedup", ["none", "exact"])
def test_a_mix_matches_the_naive_reference(tokenizer, tmp_path, dedup):
    alpaca, chat = mix_files(tmp_path)
    more = write_jsonl(tmp_path / "more.jsonl", alpaca_rows(10, start=25))  # 5 seen before
    mix = [
        {"train": alpaca, "weight": 2.0},
        {"train": chat, "weight": 1.0, "format": "chat", "fields": {"messages": "talk"}},
        {"train": str(more), "weight": 0.5},
    ]
    cfg = data_cfg(
        mix=mix, eval_fraction=0.2, max_train_examples=80, packing=True, dedup=dedup, seed=5
    )
    train, evaluation = assert_matches_reference(cfg, tokenizer)
    if dedup == "exact":
        # 5 repeats in the first source, 5 rows of the third.
        assert train.stats.duplicates == 5 + 5
        assert "10 exact duplicates dropped" in train.stats.describe(512)


def test_skipped_bad_rows_match_the_naive_reference(tokenizer, tmp_path):
    rows = alpaca_rows(20)
    rows[3] = {"instruction": "no output"}
    rows[11] = {"instruction": 4, "output": "x"}
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    path.write_text(path.read_text() + "{not json\n" + json.dumps(alpaca_rows(1)[0]) + "\n")
    cfg = data_cfg(train=str(path), eval=None, eval_fraction=0.25, on_bad_row="skip")
    train, _ = assert_matches_reference(cfg, tokenizer)
    assert [m.split(": ", 1)[0] for m in train.stats.skipped] == [
        f"{path}, row 4",
        f"{path}, row 12",
        f"{path}, line 21",
    ]


def test_several_processes_give_what_one_gives(tokenizer, tmp_path):
    """Rows in several chunks, checked and tokenized by two worker processes: the same examples
    in the same order, the same counts and data identity as one process."""
    path = write_jsonl(tmp_path / "rows.jsonl", alpaca_rows(2_600))
    splits = {}
    for processes in (1, 2):
        cfg = data_cfg(train=str(path), eval=None, num_proc=processes, cache=False, packing=True)
        splits[processes] = splits_mod.load_splits(cfg, tokenizer)
    one, two = splits[1][0], splits[2][0]
    assert one.stats == two.stats
    assert one.examples.identity() == two.examples.identity()
    assert list(one.examples) == list(two.examples)
    assert list(splits[1][1].examples) == list(splits[2][1].examples)


# ---------------------------------------------------------------------------- the cache


def changed_cfg(cfg, **changes):
    return data_cfg(**{**OmegaConf.to_container(cfg), **changes})


def no_work(chunk):
    raise AssertionError("a chunk was checked or tokenized again")


def test_the_same_inputs_hit_and_each_change_gives_a_new_key(tokenizer, tmp_path, data_cache):
    path = write_jsonl(
        tmp_path / "chat.jsonl",
        [json.loads(line) for line in resolve_bundled("bundled:chat/train.jsonl").open()],
    )
    cfg = data_cfg(train=str(path), eval=None, format="chat")
    first, _ = splits_mod.load_splits(cfg, tokenizer)
    assert not first.stats.cached
    assert (len(entries("scan")), len(entries("tokens"))) == (1, 1)

    # The same inputs: nothing is read again, the same examples come back.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(store_mod, "scan_chunk", no_work)
        patch.setattr(store_mod, "tokenize_chunk", no_work)
        again, _ = splits_mod.load_splits(cfg, tokenizer)
    assert again.stats.cached
    assert list(again.examples) == list(first.examples)
    assert again.examples.identity() == first.examples.identity()

    # Another chat template (one that renders the same): new tokens; the checked rows hold.
    other = CHATML_TEMPLATE + "{# another template #}"
    templated, _ = splits_mod.load_splits(changed_cfg(cfg, chat_template=other), tokenizer)
    assert not templated.stats.cached
    assert list(templated.examples) == list(first.examples)
    assert (len(entries("scan")), len(entries("tokens"))) == (1, 2)

    # Another tokenizer: one more added token changes nothing else about these rows.
    changed = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    changed.add_tokens(["<|new|>"])
    retokenized, _ = splits_mod.load_splits(cfg, changed)
    assert not retokenized.stats.cached
    assert list(retokenized.examples) == list(first.examples)
    assert (len(entries("scan")), len(entries("tokens"))) == (1, 3)

    # One byte of the data: checked and tokenized again.
    raw = bytearray(path.read_bytes())
    at = raw.index(b"The answer is")
    raw[at] = ord("t")
    path.write_bytes(bytes(raw))
    edited, _ = splits_mod.load_splits(cfg, tokenizer)
    assert not edited.stats.cached
    assert (len(entries("scan")), len(entries("tokens"))) == (2, 4)

    # data.cache=false: nothing written, nothing read.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cache_mod, "find_entry", lambda *a: pytest.fail("the cache was read"))
        off, _ = splits_mod.load_splits(changed_cfg(cfg, cache=False), tokenizer)
    assert not off.stats.cached
    assert list(off.examples) == list(edited.examples)
    assert (len(entries("scan")), len(entries("tokens"))) == (2, 4)


def test_an_entry_whose_files_do_not_match_its_record_is_not_used(tokenizer, tmp_path, data_cache):
    path = write_jsonl(tmp_path / "rows.jsonl", alpaca_rows(40))
    cfg = data_cfg(train=str(path), eval=None)
    first = list(splits_mod.load_splits(cfg, tokenizer)[0].examples)
    (tokens,) = entries("tokens")
    ids = tokens / "ids.bin"
    ids.write_bytes(ids.read_bytes()[:-2])  # a truncated file
    again, _ = splits_mod.load_splits(cfg, tokenizer)
    assert not again.stats.cached
    assert list(again.examples) == first
    assert cache_mod.find_entry("tokens", tokens.name.split("-", 1)[1]) == tokens  # rewritten


KILLED_WRITER = """
import os, signal, sys
from omegaconf import OmegaConf
from transformers import AutoTokenizer
from mode_cli.config import DataConfig
from mode_cli.data import cache, splits, store
from mode_cli.files import resolve_bundled

where = sys.argv[2]
if where == "mid-write":  # after the first chunk's tokens are on disk
    tokenize, calls = store.tokenize_chunk, []
    def dying(chunk):
        calls.append(chunk)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return tokenize(chunk)
    store.tokenize_chunk = dying
else:  # with every file and meta.json written, before the rename
    write_meta = cache.write_meta
    def dying(folder, kind, key, meta):
        write_meta(folder, kind, key, meta)
        if kind == "tokens":
            os.kill(os.getpid(), signal.SIGKILL)
    cache.write_meta = dying
cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), {"train": sys.argv[1], "eval": None})
tokenizer = AutoTokenizer.from_pretrained(str(resolve_bundled("bundled:tiny-tokenizer")))
splits.load_splits(cfg, tokenizer)
"""


@pytest.mark.parametrize("where", ["mid-write", "before-rename"])
def test_an_entry_written_by_a_killed_process_is_never_read(tokenizer, tmp_path, data_cache, where):
    path = write_jsonl(tmp_path / "rows.jsonl", alpaca_rows(2_500))  # three chunks
    result = run_command(
        [sys.executable, "-c", KILLED_WRITER, str(path), where],
        timeout=300,
        env={**os.environ, "MODE_DATA_CACHE": str(data_cache)},
    )
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    assert entries("tokens") == []  # no entry, only a staging folder
    (staging,) = [e.path for e in cache_mod.list_entries() if not e.complete]
    assert staging.name.startswith(".tokens-") and (staging / "ids.bin").stat().st_size > 0
    assert (staging / "meta.json").is_file() == (where == "before-rename")

    hour_ago = time.time() - 2 * cache_mod.STALE_AFTER_S
    os.utime(staging, (hour_ago, hour_ago))
    cfg = data_cfg(train=str(path), eval=None)
    train, _ = assert_matches_reference(cfg, tokenizer)
    assert not train.stats.cached
    assert not staging.exists()  # its writer is dead: swept when the next entry was written
    assert len(entries("tokens")) == 1


def test_mode_cache_lists_and_clears(mode, tmp_path, data_cache, tokenizer):
    path = write_jsonl(tmp_path / "rows.jsonl", alpaca_rows(40))
    splits_mod.load_splits(data_cfg(train=str(path), eval=None), tokenizer)
    code, out, _ = mode("cache")
    assert code == 0
    assert "2 entries" in out and str(data_cache) in " ".join(out.split())
    code, out, _ = mode("cache", "clear")
    assert code == 0 and "removed 2 entries" in out
    assert cache_mod.list_entries() == []


# ---------------------------------------------------------------------------- runs


def test_cached_and_uncached_runs_train_alike(mode, tmp_path, data_cache):
    """A run that tokenizes, one that reads the cache and one without it: the same batches, so
    the same losses; and a run stopped without the cache resumes with it, exactly."""
    args = (
        "data=mix-sample",
        "data.packing=true",
        "train.max_steps=4",
        "checkpoint.every_steps=2",
        "eval.answers=off",
        "eval.compare_base=false",
    )
    train_tiny(mode, tmp_path / "first", *args)
    assert entries("tokens")
    train_tiny(mode, tmp_path / "cached", *args)
    train_tiny(mode, tmp_path / "uncached", *args, "data.cache=false")
    losses = {
        name: [r["loss"] for r in records(tmp_path / name) if "loss" in r]
        for name in ("first", "cached", "uncached")
    }
    assert len(losses["first"]) == 4
    assert losses["cached"] == losses["first"] == losses["uncached"]

    stopped = tmp_path / "stopped"
    train_tiny(mode, stopped, *args, "data.cache=false", "train.stop_after_steps=2")
    train_tiny(mode, stopped, *args, "resume=auto")
    resumed = [r["loss"] for r in records(stopped) if "loss" in r]
    assert resumed == losses["first"]


def big_file(path: Path, rows: int, bad_at: int | None = None) -> Path:
    line = json.dumps(alpaca_rows(1)[0]) + "\n"
    with path.open("w") as handle:
        for number in range(1, rows + 1):
            handle.write('{"instruction": "no output here"}\n' if number == bad_at else line)
    return path


def test_a_bad_row_deep_in_a_large_file_is_named_and_nothing_is_written(mode, tmp_path, data_cache):
    data = big_file(tmp_path / "big.jsonl", 160_000, bad_at=150_000)
    out = tmp_path / "run"
    code, _, err = mode(
        "train",
        "recipe=tiny-llama-alpaca",
        f"data.train={data}",
        "data.eval=null",
        f"output_dir={out}",
    )
    message = " ".join(err.split())
    assert code == 2
    assert f"{data}, row 150000: missing field 'output'" in message
    assert "data.on_bad_row=skip" in message
    assert not out.exists()
    assert cache_mod.list_entries() == []


def test_dedup_is_counted_in_the_dry_run_and_the_run(mode, tmp_path, data_cache):
    data = write_jsonl(tmp_path / "rows.jsonl", alpaca_rows(30) + alpaca_rows(4, start=10))
    args = ("recipe=tiny-llama-alpaca", f"data.train={data}", "data.eval=null", "data.dedup=exact")
    code, _, err = mode("train", *args, "--dry-run")
    assert code == 0, err
    assert "4 exact duplicates dropped" in " ".join(err.split())
    run = (f"output_dir={tmp_path / 'run'}", "train.max_steps=1", "merge=false")
    code, _, err = mode("train", *args, *run)
    assert code == 0, err
    assert "4 exact duplicates dropped" in " ".join(err.split())


# ---------------------------------------------------------------------------- other sources


def test_parquet_and_csv_load_with_field_mapping(tokenizer, tmp_path):
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = alpaca_rows(30)
    rows[4]["input"] = "Count carefully."
    baseline = write_jsonl(tmp_path / "rows.jsonl", rows)
    renamed = [
        {"question": r["instruction"], "context": r.get("input", ""), "reply": r["output"]}
        for r in rows
    ]
    pq.write_table(pa.Table.from_pylist(renamed), tmp_path / "rows.parquet", row_group_size=7)
    with (tmp_path / "rows.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["question", "context", "reply"])
        writer.writeheader()
        writer.writerows(renamed)
    fields = {"instruction": "question", "input": "context", "output": "reply"}

    def examples(path, **values):
        cfg = data_cfg(train=str(path), eval=None, eval_fraction=0.2, **values)
        train, evaluation = splits_mod.load_splits(cfg, tokenizer)
        return list(train.examples), list(evaluation.examples)

    want = examples(baseline)
    assert examples(tmp_path / "rows.parquet", fields=fields) == want
    assert examples(tmp_path / "rows.csv", fields=fields) == want
    csv_cfg = data_cfg(
        train=str(tmp_path / "rows.csv"), eval=None, eval_fraction=0.2, fields=fields
    )
    held = splits_mod.eval_rows(csv_cfg)
    assert [row["instruction"] for row in held] == [rows[r.number - 1]["instruction"] for r in held]

    # A bad cell is named by its row: a CSV's row numbers count data rows, not the header.
    renamed[6]["reply"] = ""
    pq.write_table(pa.Table.from_pylist(renamed), tmp_path / "bad.parquet")
    with pytest.raises(ModeError, match=r"bad\.parquet, row 7: empty 'reply' \(data\.fields"):
        examples(tmp_path / "bad.parquet", fields=fields)


def test_chat_rows_in_parquet_and_csv(tokenizer, tmp_path):
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq

    chats = [json.loads(line) for line in resolve_bundled("bundled:chat/eval.jsonl").open()]
    baseline = write_jsonl(tmp_path / "chat.jsonl", chats)
    pq.write_table(
        pa.Table.from_pylist([{"talk": c["messages"]} for c in chats]), tmp_path / "chat.parquet"
    )
    with (tmp_path / "chat.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["talk"])
        writer.writeheader()
        writer.writerows({"talk": json.dumps(c["messages"])} for c in chats)

    def examples(path, **values):
        cfg = data_cfg(train=str(path), eval=None, format="chat", **values)
        return list(splits_mod.load_splits(cfg, tokenizer)[0].examples)

    want = examples(baseline)
    assert examples(tmp_path / "chat.parquet", fields={"messages": "talk"}) == want
    assert examples(tmp_path / "chat.csv", fields={"messages": "talk"}) == want


def test_a_streamed_hub_dataset_is_refused_offline(tokenizer, mode, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = data_cfg(train="someone/big-dataset", eval=None, streaming=True)
    with pytest.raises(
        ModeError,
        match="data.streaming=true reads the hub dataset "
        "'someone/big-dataset' over the network, and HF_HUB_OFFLINE",
    ):
        splits_mod.load_splits(cfg, tokenizer)
    code, _, err = mode(
        "train",
        "recipe=tiny-llama-alpaca",
        "data.train=someone/big-dataset",
        "data.eval=null",
        "data.streaming=true",
        "--dry-run",
    )
    assert code == 2 and "data.streaming=true reads the hub dataset" in " ".join(err.split())


def test_a_streamed_hub_dataset_reads_as_a_downloaded_one(tokenizer, monkeypatch, data_cache):
    """Streaming with only the download faked: the rows arrive as an iterable dataset."""
    import datasets

    from mode_cli.data import sources as sources_mod

    bundled = str(resolve_bundled("bundled:arithmetic/eval.jsonl"))
    real_load_dataset = datasets.load_dataset
    calls = []

    def fake_load_dataset(path, split=None, streaming=False, **kwargs):
        calls.append((path, split, streaming))
        local = real_load_dataset("json", data_files=bundled, split="train")
        return local.to_iterable_dataset() if streaming else local

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr(sources_mod, "hub_revision", lambda dataset_id: "0123abcd")
    values = {"eval": None, "eval_fraction": 0.1}
    streamed, _ = splits_mod.load_splits(
        data_cfg(train="someone/arithmetic", streaming=True, **values), tokenizer
    )
    local, _ = splits_mod.load_splits(data_cfg(train=bundled, **values), tokenizer)
    assert list(streamed.examples) == list(local.examples)
    assert calls and all(streaming for _, _, streaming in calls)
    # Keyed by the dataset's revision: the same revision comes from the cache.
    again, _ = splits_mod.load_splits(
        data_cfg(train="someone/arithmetic", streaming=True, **values), tokenizer
    )
    assert again.stats.cached


# ---------------------------------------------------------------------------- the reply's end


BROKEN_TEMPLATE = (
    "{% for m in messages %}{% if not loop.first %}<|im_end|>{% endif %}"
    "<|im_start|>{{ m.role }}:{{ m.content }}{% endfor %}"
    "{% if add_generation_prompt %}<|im_end|><|im_start|>assistant:{% endif %}"
)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    """The tiny Llama with a tokenizer that has ChatML's turn tokens as special tokens."""
    import shutil

    from transformers import AutoTokenizer

    from mode_cli.config import ModelConfig
    from mode_cli.models import loading as loading_mod

    tiny = OmegaConf.merge(OmegaConf.structured(ModelConfig), {"name_or_path": "tiny:llama"})
    folder = tmp_path_factory.mktemp("chat-model") / "model"
    shutil.copytree(loading_mod.resolve_source(tiny), folder)
    tokenizer = AutoTokenizer.from_pretrained(str(resolve_bundled("bundled:tiny-tokenizer")))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.save_pretrained(folder)
    return folder


def test_the_dry_run_marks_the_trained_tokens_and_the_trained_end_of_turn(mode, chat_model):
    args = ("recipe=tiny-llama-alpaca", f"model.name_or_path={chat_model}", "data=mix-sample")
    code, _, err = mode("train", *args, "--dry-run")
    assert code == 0, err
    shown = " ".join(err.split())
    # One example per format, trained tokens in brackets off a terminal.
    assert "example (alpaca)" in shown and "example (chat)" in shown
    assert "### Response: [[" in shown and "<|endoftext|>]]" in shown
    assert "<|im_start|>assistant [[" in shown and "<|im_end|> ]]" in shown
    assert "end of a reply: chat: a reply ends with '<|im_end|>', trained" in shown
    assert "never learns to stop" not in shown


def test_an_untrained_end_of_turn_warns_or_is_refused(mode, chat_model, tmp_path):
    args = (
        "recipe=tiny-llama-alpaca",
        f"model.name_or_path={chat_model}",
        "data=chat-sample",
        f"data.chat_template='{BROKEN_TEMPLATE}'",
    )
    code, _, err = mode("train", *args, "--dry-run")
    assert code == 0, err
    shown = " ".join(err.split())
    assert (
        "the end-of-turn token '<|im_end|>' that closes an assistant reply is not among the "
        "trained tokens" in shown
    )
    assert "[[" in shown and "<|im_end|>]]" not in shown and "<|im_end|> ]]" not in shown

    out = tmp_path / "run"
    code, _, err = mode("train", *args, "data.require_eos=true", f"output_dir={out}")
    assert code == 2
    assert "not among the trained tokens" in err and "(data.require_eos=true)" in err
    assert not out.exists()


def test_reply_end_of_each_kind_of_template(tokenizer, chat_model):
    from transformers import AutoTokenizer

    from mode_cli.data.tokenizing import reply_end

    special = AutoTokenizer.from_pretrained(str(chat_model))
    trained = reply_end("chat", special, CHATML_TEMPLATE)
    assert (trained.token, trained.trained, trained.problem) == ("<|im_end|>", True, None)
    broken = reply_end("chat", special, BROKEN_TEMPLATE)
    assert (broken.token, broken.trained) == ("<|im_end|>", False)
    # ChatML's markers are plain text to the bundled tokenizer: nothing special ends a reply.
    plain = reply_end("chat", tokenizer, CHATML_TEMPLATE)
    assert plain.token is None and "none of it a special token" in plain.problem
    assert reply_end("alpaca", tokenizer, CHATML_TEMPLATE).trained
