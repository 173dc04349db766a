"""Tests of packing short examples into full sequences: layout, labels at the seams, and parity of
a packed row's hidden states and loss with each example run alone (no attention or position
leakage across examples), then a packed run end to end."""

from __future__ import annotations

import json
import random

import pytest
import torch
from helpers import train_tiny
from omegaconf import OmegaConf

from mode_cli import files as files_mod
from mode_cli.config import DataConfig, TinyModelConfig
from mode_cli.data import batching as batching_mod
from mode_cli.data import splits as splits_mod
from mode_cli.data import tokenizing as tokenizing_mod
from mode_cli.data.tokenizing import IGNORE, Example
from mode_cli.mode.terms import LossWeights
from mode_cli.models import families as families_mod
from mode_cli.models import loading as loading_mod
from mode_cli.models import tiny as tiny_mod
from mode_cli.train.steps import batch_loss

VOCAB = 97


def example(rng: random.Random, n: int, prompt: int) -> Example:
    ids = [rng.randrange(1, VOCAB) for _ in range(n)]
    return Example(ids, [IGNORE] * prompt + ids[prompt:])


def examples(seed: int, lengths: list[int], prompt: int = 3) -> list[Example]:
    rng = random.Random(seed)
    return [example(rng, n, min(prompt, n - 1)) for n in lengths]


def segments(packed: Example) -> list[tuple[int, int]]:
    """(start, end) of each example in a packed sequence, read from its position ids."""
    starts = [i for i, p in enumerate(packed.position_ids) if p == 0]
    return list(zip(starts, [*starts[1:], len(packed.input_ids)], strict=True))


# ---------------------------------------------------------------------------- layout


def test_pack_keeps_every_example_once_within_the_length():
    items = examples(0, [5, 9, 3, 12, 7, 2, 16, 4, 8, 11])
    packed = batching_mod.pack(items, 16, seed=0)

    assert all(len(p.input_ids) <= 16 for p in packed)
    pieces = []
    for p in packed:
        assert len(p.position_ids) == len(p.input_ids) == len(p.labels)
        for start, end in segments(p):
            assert p.position_ids[start:end] == list(range(end - start))
            pieces.append(tuple(p.input_ids[start:end]))
            # The seam: an example's first token is never the target of the one before it.
            assert p.labels[start] == IGNORE
    assert sorted(pieces) == sorted(tuple(e.input_ids) for e in items)
    assert len(packed) < len(items)
    assert batching_mod.pack(items, 16, seed=0) == packed  # deterministic
    # Greedy: no sequence could have taken the first example of the next one.
    for a, b in zip(packed, packed[1:], strict=False):
        first = segments(b)[0]
        assert len(a.input_ids) + first[1] - first[0] > 16


def test_packing_trains_the_same_targets():
    items = examples(1, [6, 10, 4, 14, 9, 3, 7])
    packed = batching_mod.pack(items, 24, seed=3)
    unpacked = sum(batching_mod.target_count(batching_mod.collate([e], 0)) for e in items)
    assert batching_mod.target_count(batching_mod.collate(packed, 0)) == unpacked
    assert sum(tokenizing_mod.predicted(p) for p in packed) == sum(
        tokenizing_mod.predicted(e) for e in items
    )


def test_collate_packed_gives_padding_its_own_positions():
    a = Example([1, 2, 3, 4, 5], [IGNORE, 2, 3, IGNORE, 5], [0, 1, 2, 0, 1])
    b = Example([6, 7, 8], [IGNORE, 7, 8], [0, 1, 2])
    batch = batching_mod.collate([a, b], pad_id=0)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 0, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch["labels"][1].tolist() == [IGNORE, 7, 8, IGNORE, IGNORE]
    assert "position_ids" not in batching_mod.collate([Example([1, 2], [1, 2])], pad_id=0)


def test_load_splits_packs_the_train_split_only(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        str(files_mod.resolve_bundled("bundled:tiny-tokenizer"))
    )
    cfg = OmegaConf.merge(
        OmegaConf.structured(DataConfig),
        {
            "train": "bundled:arithmetic/eval.jsonl",
            "eval": "bundled:arithmetic/eval.jsonl",
            "max_seq_len": 512,
            "packing": True,
            "max_train_examples": 40,
            "max_eval_examples": 5,
        },
    )
    train_set, eval_set = splits_mod.load_splits(cfg, tokenizer)
    assert train_set.stats.examples == 40 and train_set.stats.packed == len(train_set.examples)
    assert len(train_set.examples) < 40 / 3
    assert sum(len(e.input_ids) for e in train_set.examples) == train_set.stats.tokens
    assert all(e.position_ids is None for e in eval_set.examples)
    assert "packed into" in train_set.stats.describe(512)


# ---------------------------------------------------------------------------- parity


def tiny_model(family: str):
    from transformers import AutoModelForCausalLM

    shape = OmegaConf.structured(
        TinyModelConfig(hidden_size=32, num_layers=2, intermediate_size=64)
    )
    special = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
    config = tiny_mod.tiny_config(family, shape, VOCAB, special)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


# Every supported family. Mistral's and Gemma 2's sliding window (32) is shorter than the longest
# example here, so packing is checked with sliding-window layers too.
@pytest.mark.parametrize(
    "family", ["llama", "qwen2", "gpt_neox", "mistral", "qwen3", "gemma", "gemma2", "phi3"]
)
def test_packed_hidden_states_equal_each_example_alone(family):
    model = tiny_model(family)
    items = examples(2, [7, 13, 40, 5, 21, 9, 30])
    packed = batching_mod.pack(items, 64, seed=0)
    assert any(len(segments(p)) > 1 for p in packed)
    batch = batching_mod.collate(packed, pad_id=0)

    with torch.no_grad():
        states = families_mod.hidden_states(
            model, batch["input_ids"], batch["attention_mask"], batch["position_ids"]
        )
        for row, p in enumerate(packed):
            for start, end in segments(p):
                ids = torch.tensor([p.input_ids[start:end]])
                alone = families_mod.hidden_states(model, ids, torch.ones_like(ids))
                for layer, (got, want) in enumerate(zip(states, alone, strict=True)):
                    torch.testing.assert_close(
                        got[row, start:end], want[0], atol=1e-5, rtol=1e-5, msg=f"layer {layer}"
                    )


def test_packed_rows_leak_without_position_ids():
    """The check above can fail: the same packed row under a plain causal mask differs."""
    model = tiny_model("llama")
    packed = batching_mod.pack(examples(2, [7, 13, 9]), 64, seed=0)
    batch = batching_mod.collate(packed, pad_id=0)
    with torch.no_grad():
        isolated = families_mod.hidden_states(
            model, batch["input_ids"], batch["attention_mask"], batch["position_ids"]
        )[-1]
        leaking = families_mod.hidden_states(model, batch["input_ids"], batch["attention_mask"])[-1]
    start, end = segments(packed[0])[1]
    assert not torch.allclose(isolated[0, start:end], leaking[0, start:end], atol=1e-3)


@pytest.mark.parametrize("loss", ["final-only", "mode"])
def test_packed_loss_equals_the_sum_over_examples(loss):
    from mode_cli.mode.head import MoDEHead

    model = tiny_model("llama")
    head = None
    if loss == "mode":
        head = MoDEHead(
            final_norm=families_mod.final_norm(model),
            layers=[1, 2],
            num_layers=2,
            hidden_size=32,
            router="token",
            init_final_weight=0.9,
        )
    weights = LossWeights(ensemble=1.0, layers=(0.5, 0.5), distill=0.1)
    items = examples(4, [8, 15, 6, 22, 11])
    packed = batching_mod.pack(items, 48, seed=1)
    with torch.no_grad():
        together = batch_loss(model, head, batching_mod.collate(packed, 0), weights)
        alone = [batch_loss(model, head, batching_mod.collate([e], 0), weights) for e in items]
    torch.testing.assert_close(together.total, sum(a.total for a in alone), atol=1e-4, rtol=1e-5)


# ---------------------------------------------------------------------------- end to end


def test_packed_run_trains(mode, tmp_path):
    out = tmp_path / "packed"
    train_tiny(
        mode,
        out,
        "data.packing=true",
        "data.max_seq_len=256",
        "data.max_train_examples=24",
        "data.max_eval_examples=4",
        "train.max_steps=2",
        "train.micro_batch_size=2",
        "eval.compare_base=false",
    )
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2
    # Each step trained on two of the packed rows the run's data config gives.
    cfg = OmegaConf.load(out / "config.yaml")
    tokenizer = loading_mod.load_tokenizer(loading_mod.resolve_source(cfg.model), cfg.model)
    train_set, _ = splits_mod.load_splits(cfg.data, tokenizer)
    packed = train_set.examples
    assert sum(len(segments(p)) for p in packed) == 24 and len(packed) <= 14
    counts = [tokenizing_mod.predicted(p) for p in packed]
    pairs = {a + b for i, a in enumerate(counts) for b in counts[i + 1 :]}
    assert all(r["target_tokens"] in pairs for r in records)
