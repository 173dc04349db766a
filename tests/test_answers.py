"""Answer accuracy you can afford: decoding from a dequantized copy on the CPU, the base before
tuning beside the tuned heads, intervals, and answers on by default for small models."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from mode_cli.artifacts import load_run, load_run_config
from mode_cli.config import ModelConfig
from mode_cli.eval import answers as answers_mod
from mode_cli.eval import render as render_mod
from mode_cli.eval.report import latest_report
from mode_cli.eval.stats import wilson_interval
from mode_cli.models.loading import load_base_model, resolve_source


def end_of_training_report(run):
    return json.loads(sorted((run / "eval").glob("*/report.json"))[0].read_text())


@pytest.fixture(scope="module")
def loaded_run(tiny_run):
    cfg = load_run_config(tiny_run)
    cfg.eval.max_new_tokens = 10
    model, head, tokenizer = load_run(tiny_run, cfg, "cpu")
    rows = answers_mod.answer_rows(cfg)[:6]
    prompts = answers_mod.answer_prompts(cfg, rows, tokenizer)
    return cfg, model, head, tokenizer, prompts


@torch.no_grad()
def test_the_dequantized_copy_gives_the_4bit_models_logits_and_greedy_answers(tiny_run, loaded_run):
    """The copy's weights are the NF4 weights dequantized (and the adapter merged): bitsandbytes'
    CPU 4-bit layer computes the same fp32 matmul, so only rounding order differs."""
    cfg, model, head, tokenizer, prompts = loaded_run
    assert answers_mod.decodes_dequantized(model, "cpu")
    source = resolve_source(cfg.model)
    adapter = tiny_run / "adapter"
    ids = tokenizer(prompts.texts[0], return_tensors="pt")
    kinds = ["ensemble", "final"]
    quantized = answers_mod.decode_answers(cfg, model, head, tokenizer, "cpu", prompts, kinds)
    with answers_mod.decoding_model(cfg, model, "cpu", source=source, adapter=adapter) as copy:
        assert answers_mod.quantized_4bit(model) and not answers_mod.quantized_4bit(copy)
        assert all(p.dtype == torch.float32 for p in copy.parameters())
        torch.testing.assert_close(copy(**ids).logits, model(**ids).logits, atol=1e-5, rtol=1e-5)
        dequantized = answers_mod.decode_answers(cfg, copy, head, tokenizer, "cpu", prompts, kinds)
    assert dequantized == quantized
    # The base side: the copy without the adapter equals the 4-bit model with it switched off.
    with model.disable_adapter():
        base_logits = model(**ids).logits
        base_quantized = answers_mod.decode_answers(
            cfg, model, None, tokenizer, "cpu", prompts, ["final"]
        )["final"]
    with answers_mod.decoding_model(
        cfg, model, "cpu", source=source, adapter=adapter, tuned=False
    ) as copy:
        torch.testing.assert_close(copy(**ids).logits, base_logits, atol=1e-5, rtol=1e-5)
    base = answers_mod.base_answers(
        cfg, model, tokenizer, "cpu", prompts, source=source, adapter=adapter
    )
    assert base == base_quantized
    assert base != quantized["final"]  # the adapter changed some answer: the sides differ


@torch.no_grad()
def test_base_and_tuned_answers_decode_from_one_dequantized_copy(tiny_run, loaded_run, monkeypatch):
    """With the base compared, the copy is dequantized once: the base decodes from it, then the
    adapter is merged into it. The answers equal each side decoded from its own copy."""
    cfg, model, head, tokenizer, prompts = loaded_run
    source, adapter = resolve_source(cfg.model), tiny_run / "adapter"
    rows = answers_mod.answer_rows(cfg)[:6]
    base = answers_mod.base_answers(
        cfg, model, tokenizer, "cpu", prompts, source=source, adapter=adapter
    )
    with answers_mod.decoding_model(cfg, model, "cpu", source=source, adapter=adapter) as copy:
        tuned = answers_mod.decode_answers(
            cfg, copy, head, tokenizer, "cpu", prompts, ["ensemble", "final"]
        )
    built, decoded = [], []
    dequantize, decode = answers_mod.dequantized_base, answers_mod.decode_answers
    monkeypatch.setattr(
        answers_mod, "dequantized_base", lambda *a: built.append(a) or dequantize(*a)
    )
    monkeypatch.setattr(
        answers_mod, "decode_answers", lambda *a: decoded.append(decode(*a)) or decoded[-1]
    )
    answers_mod.evaluate_answers(
        cfg, model, head, tokenizer, "cpu", rows, source=source, adapter=adapter, base=True
    )
    assert len(built) == 1
    assert decoded == [{"final": base}, tuned]
    with pytest.raises(ValueError, match="base before tuned"):
        next(answers_mod.decoding_sides(
            cfg, model, "cpu", ["tuned", "base"], source=source, adapter=adapter
        ))  # fmt: skip


def test_the_end_of_training_report_scores_base_final_and_ensemble(tiny_run):
    """A tiny base is far below eval.answers_auto_max_params: answers are on by default."""
    answers = end_of_training_report(tiny_run)["answers"]
    assert answers["decoded_from"] == "dequantized" and answers["interval"] == "wilson"
    assert set(answers["heads"]) == {"ensemble", "final"} and set(answers["base"]) == {"final"}
    n = answers["examples"]
    assert n == 16  # every eval row of arithmetic-sample (eval.answer_examples is 32)
    for score in [*answers["heads"].values(), answers["base"]["final"]]:
        assert score["accuracy"] == score["correct"] / n
        assert score["interval"] == pytest.approx(list(wilson_interval(score["correct"], n)))


def test_answers_are_on_by_default_up_to_a_size(model_cache):
    cfg = OmegaConf.structured(ModelConfig(name_or_path="tiny:llama"))
    model = load_base_model(resolve_source(cfg), cfg, "fp32", "cpu")
    unpacked = sum(p.numel() for p in model.parameters()) + sum(
        p.numel() for n, p in model.named_parameters() if "proj" in n
    )  # each NF4 byte packs two weights of a projection
    assert answers_mod.base_parameters(model) == unpacked
    recipe = OmegaConf.create({"eval": {"answers_auto_max_params": unpacked}})
    assert answers_mod.answers_by_default(recipe, model)
    recipe.eval.answers_auto_max_params = unpacked - 1
    assert not answers_mod.answers_by_default(recipe, model)


def test_mode_eval_reports_base_tuned_final_and_tuned_ensemble_with_intervals(tiny_run, mode):
    code, _, err = mode("eval", f"checkpoint={tiny_run}", "examples=4", "eval.max_new_tokens=6")
    assert code == 0, err
    folder = latest_report(tiny_run).parent
    answers = json.loads((folder / "report.json").read_text())["answers"]
    assert answers["examples"] == 4 and answers["base"]["final"]["interval"] is not None
    rows = render_mod.answers_rows(answers)
    assert [row[:2] for row in rows] == [
        ["base", "final"],
        ["tuned", "final"],
        ["tuned", "ensemble"],
    ]
    flat = " ".join(err.split())
    markdown = (folder / "report.md").read_text()
    for side, head, correct, rate, interval in rows:
        assert f"| {side} | {head} | {correct} | {rate} | {interval} |" in markdown
        assert f"{side} │ {head} │ {correct} │ {rate} │ {interval}" in flat


def test_merged_folder_with_compare_base_scores_the_original_base(tiny_run, mode, tmp_path):
    code, _, err = mode(
        "eval", f"checkpoint={tiny_run / 'merged'}", "compare=base", "examples=3",
        "eval.max_new_tokens=6", f"eval.output_dir={tmp_path}",
    )  # fmt: skip
    assert code == 0, err
    answers = json.loads(next(tmp_path.glob("*/report.json")).read_text())["answers"]
    assert answers["decoded_from"] == "loaded"  # the merged weights are fp32 already
    assert set(answers["base"]) == {"final"} and set(answers["heads"]) == {"ensemble", "final"}


def test_scores_of_an_older_report_get_their_interval_computed():
    older = {  # schema version 2: no base, no intervals
        "examples": 20,
        "heads": {
            "ensemble": {"correct": 5, "accuracy": 0.25},
            "final": {"correct": 0, "accuracy": 0},
        },
    }
    rows = render_mod.answers_rows(older)
    assert rows == [
        ["tuned", "final", "0 / 20", "0.000", "0.000-0.161"],
        ["tuned", "ensemble", "5 / 20", "0.250", "0.112-0.469"],
    ]


def test_score_with_the_base():
    result = answers_mod.score(
        ["1", "2", "3", "4"],
        ["p1", "p2", "p3", "p4"],
        {"final": ["The answer is 1.", "2", "x", "5"]},
        "number",
        base=["0", "0", "3", "0"],
    )
    assert result["heads"]["final"]["correct"] == 2 and result["base"]["final"]["correct"] == 1
    assert result["base"]["final"]["interval"] == pytest.approx(list(wilson_interval(1, 4)))
    assert result["agreement"] is None  # one tuned head: nothing to compare it with
    assert answers_mod.score(["1"], ["p"], {"final": ["1"]}, "number")["base"] is None
