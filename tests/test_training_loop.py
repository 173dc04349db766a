"""The training loop's parts: gradient accumulation, LR schedules, optimizers, non-finite losses,
out-of-memory errors, eval during training and the end-of-run summary."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from helpers import records

from mode_cli.data import batching as batching_mod
from mode_cli.recipes import compose_recipe
from mode_cli.train import checkpoint as checkpoint_mod
from mode_cli.train import optim as optim_mod
from mode_cli.train import recipe as recipe_mod
from mode_cli.train import steps as steps_mod

QUICK = [
    "recipe=tiny-llama-alpaca",
    "merge.enabled=false",
    "eval.compare_base=false",
    "eval.answers=off",
    "eval.max_examples=4",
]


def train(mode, out: Path, *overrides: str) -> tuple[int, str]:
    code, _, err = mode("train", *QUICK, f"output_dir={out}", *overrides)
    return code, " ".join(err.split())  # rich wraps long lines at 80 columns off a terminal


# ---------------------------------------------------------------------------- accumulation


@pytest.fixture(scope="module")
def tiny_recipe():
    """The tiny recipe's model, head and data, loaded once (fp32, NF4 base, no dropout)."""
    cfg = compose_recipe("tiny-llama-alpaca", ["adapter.dropout=0.0", "train.device=cpu"])
    recipe = recipe_mod.FinetuneRecipe(cfg)
    recipe.setup_data()
    recipe.setup_model()
    recipe.model.train()
    return recipe


def gradients_of(recipe, micro_batches: list[list]) -> tuple[steps_mod.StepLoss, dict]:
    recipe.optimizer.zero_grad(set_to_none=True)
    pad = recipe.tokenizer.pad_token_id
    micro = [batching_mod.collate(examples, pad) for examples in micro_batches]
    result = steps_mod.accumulate_gradients(
        recipe.wrapped, micro, recipe.step_weights(1), recipe.cfg.loss.impl
    )
    grads = {
        name: p.grad.clone()
        for name, p in [*recipe.model.named_parameters(), *recipe.head.named_parameters()]
        if p.grad is not None
    }
    recipe.optimizer.zero_grad(set_to_none=True)
    return result, grads


def test_accumulation_gives_one_gradient_however_the_step_is_split(tiny_recipe):
    """8 examples as 8x1, 1x8 and 2x4 (micro-batch x accumulation): the same loss and gradients."""
    examples = tiny_recipe.train_set.examples[:8]
    targets = [e.trained_tokens for e in examples]
    assert len(set(targets)) > 1  # uneven micro-batches: per-micro-batch means would differ

    whole, reference = gradients_of(tiny_recipe, [examples])
    assert whole.target_tokens == sum(targets)
    for size in (1, 2):
        split = [examples[i : i + size] for i in range(0, 8, size)]
        result, grads = gradients_of(tiny_recipe, split)
        assert result.loss == pytest.approx(whole.loss, rel=1e-6)
        assert result.parts == pytest.approx(whole.parts, rel=1e-5)
        assert grads.keys() == reference.keys() and len(grads) > 4
        for name, grad in grads.items():
            torch.testing.assert_close(grad, reference[name], rtol=1e-4, atol=1e-7, msg=name)

    # The naive alternative, each micro-batch's mean averaged over the step, is measurably off:
    # what the test above would catch.
    per_micro = {}
    for example in examples:
        _, grads = gradients_of(tiny_recipe, [[example]])
        for name, grad in grads.items():
            share = grad * sum(targets) / example.trained_tokens / 8
            per_micro[name] = per_micro.get(name, 0) + share
    assert any(
        not torch.allclose(per_micro[name], reference[name], rtol=1e-3, atol=1e-6)
        for name in reference
    )


def test_micro_batching_does_not_change_the_training_run(mode, tmp_path):
    """End to end: the same 8 examples per step as 8x1, 1x8 and 2x4 give the same losses (and
    the linear schedule the logged learning rates)."""
    runs = {}
    for micro, accum in ((8, 1), (1, 8), (2, 4)):
        out = tmp_path / f"{micro}x{accum}"
        code, err = train(
            mode,
            out,
            "data.max_train_examples=8",
            "train.max_steps=3",
            "train.warmup_steps=1",
            "train.lr_schedule=linear",
            f"train.micro_batch_size={micro}",
            f"train.grad_accum_steps={accum}",
        )
        assert code == 0, err
        runs[micro, accum] = [r["loss"] for r in records(out)]
        assert [r["lr"] for r in records(out)] == pytest.approx([5e-4, 1e-3, 5e-4])
    reference = runs[8, 1]
    assert len(reference) == 3 and reference[2] != reference[0]
    for losses in runs.values():
        assert losses == pytest.approx(reference, rel=1e-5)


# ---------------------------------------------------------------------------- schedules, optimizers


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_lr_schedules_warm_up_then_decay_to_the_floor_after_the_last_step(schedule):
    """20 steps (scheduler steps 0-19): the floor is where step 20 would be, so the last step
    still learns (a floor at the last step made it a forward/backward that updated nothing)."""
    factor = optim_mod.lr_lambda(warmup=4, total=20, min_ratio=0.1, schedule=schedule)
    values = [factor(step) for step in range(20)]
    assert values[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert values[4] == pytest.approx(1.0)
    if schedule == "constant":
        assert values[4:] == pytest.approx([1.0] * 16)
        return
    assert factor(20) == pytest.approx(0.1)
    assert values[19] > 0.1 + 1e-3
    assert all(a >= b for a, b in zip(values[4:], values[5:], strict=False))
    middle = 4 + (20 - 4) / 2  # halfway through the decay: both are at the mean of peak and floor
    if schedule == "linear":
        assert factor(middle) == pytest.approx(0.55)
        assert values[5] - values[6] == pytest.approx(values[17] - values[18])
    else:
        assert factor(middle) == pytest.approx(0.55)
        assert values[5] - values[6] < values[11] - values[12]  # slow, fast, slow
        assert values[17] - values[18] < values[11] - values[12]
    # The default floor is 0: every step of a run still has a learning rate above it.
    assert optim_mod.lr_lambda(4, 20, 0.0, schedule)(19) > 0


def test_the_last_step_of_a_default_run_learns(tiny_run):
    """With the default schedule (cosine to min_lr_ratio 0), the last record's lr is above 0."""
    assert records(tiny_run)[-1]["lr"] > 0


def test_8bit_optimizers_on_the_cpu_are_refused_or_fall_back_to_adamw(mode, tmp_path):
    from omegaconf import OmegaConf

    from mode_cli.config import RecipeConfig

    code, err = train(mode, tmp_path / "r", "train.optimizer=paged_adamw_8bit")
    assert code == 2 and "needs a CUDA GPU" in err and "train.optimizer_fallback=true" in err
    assert not (tmp_path / "r").exists()

    cfg = OmegaConf.structured(RecipeConfig)
    cfg.train.optimizer = "adamw_8bit"
    model = torch.nn.Linear(3, 2)
    with pytest.raises(Exception, match="needs a CUDA GPU"):
        optim_mod.make_optimizer(cfg, model, None, "cpu")
    cfg.train.optimizer_fallback = True
    optimizer = optim_mod.make_optimizer(cfg, model, None, "cpu")
    assert type(optimizer) is torch.optim.AdamW


def test_weight_decay_spares_dora_magnitudes_norms_and_biases(tiny_recipe):
    """train.weight_decay pulls weights toward 0: right for LoRA's matrices, wrong for DoRA's
    magnitude vectors (the adapted weights' column norms), norm weights and biases, which get
    none. The MoDE head (norms and router) has its own group, without decay."""
    from omegaconf import OmegaConf

    from mode_cli.models.loading import attach_adapter, load_base_model

    cfg = tiny_recipe.cfg.copy()
    OmegaConf.update(cfg, "train.weight_decay", 0.1)
    OmegaConf.update(cfg, "adapter.use_dora", True)
    base = load_base_model(tiny_recipe.source, cfg.model, "fp32", "cpu")
    model = attach_adapter(base, cfg.adapter, False)
    # A trainable bias and norm weight, as a recipe training them beside the adapter would have.
    decoder_layer = model.get_base_model().model.layers[0]
    decoder_layer.input_layernorm.weight.requires_grad_(True)
    extra_bias = torch.nn.Parameter(torch.zeros(3))
    decoder_layer.register_parameter("extra_bias", extra_bias)
    optimizer = optim_mod.make_optimizer(cfg, model, tiny_recipe.head, "cpu")

    decay_of = {
        id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]
    }
    names = {id(p): name for name, p in model.named_parameters() if p.requires_grad}
    magnitudes = [i for i, name in names.items() if "lora_magnitude_vector" in name]
    matrices = [i for i, name in names.items() if "lora_A" in name or "lora_B" in name]
    assert magnitudes and matrices
    assert all(decay_of[i] == 0.0 for i in magnitudes)
    assert all(decay_of[i] == 0.1 for i in matrices)
    assert decay_of[id(decoder_layer.input_layernorm.weight)] == 0.0
    assert decay_of[id(extra_bias)] == 0.0
    assert all(decay_of[id(p)] == 0.0 for p in tiny_recipe.head.parameters())
    assert len(decay_of) == len(names) + len(list(tiny_recipe.head.parameters()))


def test_plain_lora_keeps_two_parameter_groups(tiny_recipe):
    """LoRA has only matrices: the adapter stays one group, so checkpoints written before the
    no-decay group existed still resume."""
    groups = tiny_recipe.optimizer.param_groups
    assert len(groups) == 2
    assert [group["initial_lr"] for group in groups] == [tiny_recipe.cfg.train.lr] * 2


# ---------------------------------------------------------------------------- faults


def poison_call(monkeypatch, at: int, fault):
    """Make the `at`-th micro-batch loss of the run go wrong (NaN, OOM) through `fault(sums)`."""
    real, calls = steps_mod.batch_loss, []

    def batch_loss(*args, **kwargs):
        calls.append(1)
        sums = real(*args, **kwargs)
        return fault(sums) if len(calls) == at else sums

    monkeypatch.setattr(steps_mod, "batch_loss", batch_loss)


def nan_loss(sums):
    return dataclasses.replace(sums, total=sums.total * math.nan)


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_state(mode, tmp_path, monkeypatch):
    poison_call(monkeypatch, at=4, fault=nan_loss)
    out = tmp_path / "run"
    code, err = train(mode, out, "train.max_steps=6", "checkpoint.every_steps=2")
    assert code == 2
    assert "loss became nan" in err and "at step 4" in err and "train.on_nonfinite=skip" in err
    # The state before the bad step, checkpointed on the way out, next to step 2's.
    assert [p.name for p in checkpoint_mod.complete_checkpoints(out)] == [
        "step-000002",
        "step-000003",
    ]
    assert [r["step"] for r in records(out)] == [1, 2, 3]

    code, err = train(
        mode, out, "train.max_steps=6", "checkpoint.every_steps=2", "resume=auto",
        "train.on_nonfinite=skip",
    )  # fmt: skip
    assert code == 0, err
    assert [r["step"] for r in records(out)] == [1, 2, 3, 4, 5, 6]


def test_skipped_nan_steps_are_counted_and_eval_runs_during_training(mode, tmp_path, monkeypatch):
    poison_call(monkeypatch, at=3, fault=nan_loss)
    out = tmp_path / "run"
    code, err = train(
        mode, out, "train.max_steps=4", "train.on_nonfinite=skip", "eval.every_steps=2"
    )
    assert code == 0, err
    assert "update skipped (1 so far)" in err
    assert "training summary" in err and "skipped steps │ 1" in err
    steps = records(out)
    assert [r["step"] for r in steps if "loss" in r] == [1, 2, 4]
    state = json.loads((out / "checkpoints" / "step-000004" / "trainer_state.json").read_text())
    assert state["skipped_steps"] == 1

    evals = [r for r in steps if "eval" in r]
    assert [r["step"] for r in evals] == [2, 4]
    result = evals[-1]["eval"]
    assert set(result["layers"]) == {"2", "3", "4"} and result["final"] == result["layers"]["4"]
    assert result["ensemble"] > 0 and result["examples"] == 4
    assert sum(result["router"].values()) == pytest.approx(1.0, abs=1e-6)
    assert "eval @ step 4" in err


def test_out_of_memory_names_the_memory_settings_after_a_checkpoint(mode, tmp_path, monkeypatch):
    def oom(sums):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    poison_call(monkeypatch, at=3, fault=oom)
    out = tmp_path / "run"
    code, err = train(mode, out, "train.max_steps=5", "checkpoint.every_steps=null")
    assert code == 2
    assert "out of memory on the CPU at step 3" in err
    for setting in (
        "train.micro_batch_size (now 4",
        "data.max_seq_len (now",
        "train.gradient_checkpointing=true (now false",
    ):
        assert setting in err
    assert [p.name for p in checkpoint_mod.complete_checkpoints(out)] == ["step-000002"]
    assert "step-000002" in err
