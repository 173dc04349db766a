"""What the memory plan reads from a model's config.json alone (`mode_cli/train/footprint.py`),
held to the model the recipe really loads: parameter counts against the loaded 4-bit model and
adapter, the stand-in's activations against the full-width model's; and `mode plan` on
Llama-3-8B's shape (its bundled config.json: no weights)."""

from __future__ import annotations

import json
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from helpers import load_script

from mode_cli.errors import ModeError
from mode_cli.models.loading import attach_adapter, load_base_model, resolve_source
from mode_cli.recipes import compose_recipe
from mode_cli.train import footprint
from mode_cli.train.heads import build_head
from mode_cli.train.memory import GIB, ModelFacts, weight_bytes

FAMILIES = ("llama", "gemma2", "gpt-neox", "phi3")
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("family", FAMILIES)
def test_parameter_counts_are_the_loaded_models(family):
    cfg = compose_recipe(f"tiny-{family}-alpaca", [])
    config, _ = footprint.model_config(cfg.model)
    counted = footprint.count_parameters(config, cfg)
    base = load_base_model(resolve_source(cfg.model), cfg.model, "fp32", "cpu")
    model = attach_adapter(base, cfg.adapter, False)
    head = build_head(cfg, model, "cpu")

    packed = state = dense = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            packed += module.weight.numel() * module.weight.element_size()
            s = module.weight.quant_state
            parts = [s.absmax, s.code, s.state2.absmax, s.state2.code, s.offset]
            state += sum(t.numel() * t.element_size() for t in parts)
    for param in model.parameters():
        if type(param).__name__ != "Params4bit" and not param.requires_grad:
            dense += param.numel() * param.element_size()
    facts = ModelFacts(
        source="", num_layers=0, hidden_size=0, vocab_size=0, params=counted, activations=None
    )
    planned = weight_bytes(facts)
    assert planned["quantized"] == packed
    assert state <= planned["quant_state"] <= state + 4 * counted.quantized_tensors
    assert planned["dense"] == dense  # fp32 after peft's k-bit preparation
    assert sum(counted.adapter) == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert counted.head == sum(p.numel() for p in head.parameters())


def test_the_stand_in_measures_what_the_full_width_model_saves(monkeypatch):
    """Widths scaled down by 4 give the full-width model's saved bytes per token, within what
    the stand-in keeps per attention head (the log-sum-exp: heads, not widths)."""
    overrides = ["model.tiny.hidden_size=128", "model.tiny.intermediate_size=256", "adapter.r=8"]
    cfg = compose_recipe("tiny-llama-alpaca", [*overrides, "adapter.dropout=0.1"])
    config, _ = footprint.model_config(cfg.model)
    monkeypatch.setattr(footprint, "SCALES", (1,))
    full, scale = footprint.probe_activations(config, cfg)
    assert scale == 1
    monkeypatch.setattr(footprint, "SCALES", (4,))
    small, scale = footprint.probe_activations(config, cfg)
    assert scale == 4
    assert small.layer.per_token == pytest.approx(full.layer.per_token, rel=0.03)
    assert small.layer.per_row_square == full.layer.per_row_square  # the mask, not scaled
    assert small.dropout_mask_per_token == pytest.approx(full.dropout_mask_per_token, rel=0.01)
    assert small.outside.per_position == full.outside.per_position  # rotary cos / sin
    assert full.input_per_token == 128 * 4  # the fp32 residual stream


def test_dropout_and_bf16_change_what_is_saved():
    cfg = compose_recipe("tiny-llama-alpaca", ["adapter.dropout=0.0"])
    config, _ = footprint.model_config(cfg.model)
    plain, _ = footprint.probe_activations(config, cfg)
    dropped, _ = footprint.probe_activations(
        config, compose_recipe("tiny-llama-alpaca", ["adapter.dropout=0.1"])
    )
    assert plain.dropout_mask_per_token == 0 and dropped.dropout_mask_per_token > 0
    assert dropped.layer.per_token > plain.layer.per_token + dropped.dropout_mask_per_token / 2
    bf16, _ = footprint.probe_activations(
        config, compose_recipe("tiny-llama-alpaca", ["adapter.dropout=0.0", "train.precision=bf16"])
    )
    assert bf16.layer.constant > 0  # autocast's bf16 copies of the adapter's weights
    assert bf16.layer.per_token < plain.layer.per_token


def test_a_hub_model_out_of_reach_is_planned_from_the_bundled_config():
    cfg = compose_recipe("llama3-8b-alpaca", [])
    config, source = footprint.model_config(cfg.model)
    assert "bundled copy" in source and config.num_hidden_layers == 32
    counted = footprint.count_parameters(config, cfg)
    assert counted.quantized == 6_979_321_856  # every linear layer of the 32 decoder layers
    assert counted.dense == 1_050_939_392  # embeddings, LM head, norms
    assert sum(counted.adapter) == 41_943_040  # LoRA r16 on all of them
    unknown = compose_recipe("llama3-8b-alpaca", ["model.name_or_path=nobody/no-such-model"])
    with pytest.raises(ModeError, match="Could not read the config of 'nobody/no-such-model'"):
        footprint.model_config(unknown.model)


def test_plan_of_the_8b_recipe_states_its_peak_and_fits_24gb(mode):
    code, out, err = mode("plan", "recipe=llama3-8b-alpaca", "--memory", "24GB")
    assert code == 0, err
    text = " ".join(out.split())
    assert "memory plan of llama3-8b-alpaca on cuda" in text
    assert "micro-batch 4 x 2048 tokens, gradient checkpointing on, paged_adamw_8bit, bf16" in text
    assert "4-bit weights 3.25 GiB" in text and "unquantized layers 3.92 GiB" in text
    assert "peak (backward)" in text and "fits in 24.00 GiB (--memory)" in text

    code, out, err = mode("plan", "recipe=llama3-8b-alpaca", "--memory", "24GB", "--json")
    record = json.loads(out)
    assert record["fits"] is True and 12 * GIB < record["peak_bytes"] < 22 * GIB
    assert record["measured_constants"] is False  # CUDA's: not measured yet


def test_plan_of_the_8b_recipe_with_cpu_settings_on_12gb_names_what_to_change(mode):
    code, out, err = mode("plan", "recipe=llama3-8b-alpaca", "train=cpu-demo", "--memory", "12GB")
    assert code == 1, err  # does not fit
    text = " ".join(out.split())
    assert "does not fit in 12.00 GiB (--memory)" in text and "to make it fit, change:" in text
    assert "train.gradient_checkpointing=true" in text
    assert "train.micro_batch_size=1 train.grad_accum_steps=4" in text
    code, out, _ = mode(
        "plan", "recipe=llama3-8b-alpaca", "train=cpu-demo", "--memory", "12GB", "--json"
    )
    suggestions = json.loads(out)["suggestions"]
    assert all(s["saving"] > 0 for s in suggestions)
    assert any(s["fits"] for s in suggestions)
    fitting = next(s for s in suggestions if s["fits"])
    words = fitting["change"].split() + ["train=cpu-demo"]
    code, out, _ = mode("plan", "recipe=llama3-8b-alpaca", *words, "--memory", "12GB", "--json")
    assert code == 0 and json.loads(out)["fits"] is True  # the suggestion, applied, fits


@pytest.mark.parametrize(
    "budget, message",
    [
        ("-1GB", "--memory='-1GB': expected a memory size such as 12GB"),
        ("lots", "--memory='lots': expected a memory size such as 12GB"),
        ("2GB", "--memory=2.00 GiB is below what the model's weights alone take (7.27 GiB"),
    ],
)
def test_bad_budgets_get_one_clear_message(mode, budget, message):
    code, out, err = mode("plan", "recipe=llama3-8b-alpaca", "--memory", budget)
    assert code == 2 and out == ""
    text = " ".join(err.split())
    assert text.startswith("error:") and message in text
    assert "Traceback" not in err


def test_the_dry_run_shows_the_plan_on_a_budget(mode):
    code, _, err = mode("train", "recipe=tiny-llama-alpaca", "--dry-run", "--memory", "4GB")
    assert code == 0, err
    text = " ".join(err.split())
    assert "memory plan of tiny-llama-alpaca on cpu" in text
    assert "tokenized data" in text and "fits in 4.00 GiB (--memory)" in text
    code, _, err = mode("train", "recipe=tiny-llama-alpaca", "--memory", "4GB")
    assert code == 2 and "--memory goes with --dry-run" in err
    sweep = ("train", "-m", "recipe=tiny-llama-alpaca", "train.lr=1e-3,2e-3", "--memory", "4GB")
    for words in (sweep, (*sweep, "--dry-run")):
        code, _, err = mode(*words)
        assert code == 2 and "--memory plans one run" in " ".join(err.split()), err


def test_probing_leaves_the_random_streams_alone():
    cfg = compose_recipe("tiny-qwen3-alpaca", [])
    config, _ = footprint.model_config(cfg.model)
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    footprint.probe_activations(config, cfg)
    assert torch.equal(torch.rand(3), expected)


def test_plan_reads_the_recipes_budget_and_shows_autos_choice(mode):
    code, out, err = mode(
        "plan", "recipe=tiny-llama-alpaca", "train.micro_batch_size=auto", "train.memory_budget=4GB"
    )
    assert code == 0, err
    text = " ".join(out.split())
    assert "memory plan of tiny-llama-alpaca on cpu: tiny:llama" in text
    assert "train.micro_batch_size=auto: 4 (train.grad_accum_steps 1)" in text
    assert "fits in 4.00 GiB (train.memory_budget)" in text


def test_the_published_calibration_holds_the_shipped_constants_to_every_run(tmp_path, capsys):
    """`bench_memory.py --calibrate --refit RUNS --keep-constants`: the runs docs/benchmarks.md
    shows, predicted again by today's plan with the constants mode ships (not refitted, so runs
    left out of their fit test them), each within its target; the constants file is untouched."""
    bench = load_script("bench_memory")
    shipped = bench.CALIBRATION_FILE.read_text()
    runs = REPO / "docs" / "memory_plan_runs.json"
    out = tmp_path / "runs.json"
    words = ["--calibrate", "--refit", str(runs), "--keep-constants", "--json-out", str(out)]
    bench.main([*words, "--doc", ""])
    assert bench.CALIBRATION_FILE.read_text() == shipped
    saved = json.loads(runs.read_text())["runs"]
    text = capsys.readouterr().out
    assert f"{len(saved)} of {len(saved)} within target" in text
    fitted_on = json.loads(shipped)["cpu"]["fitted_on"]
    assert f"on {fitted_on} runs of this grid (the rest held out)" in text
