"""The memory plan (`mode_cli/train/memory.py`): its arithmetic on fixed inputs, budgets, what it
suggests, and `train.micro_batch_size=auto`'s choice. What the plan reads from a real model is
tested in tests/test_memory_footprint.py; how it compares with measured runs is a benchmark
(`scripts/bench_memory.py --calibrate`, docs/benchmarks.md)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from mode_cli.errors import ModeError
from mode_cli.mode import chunked
from mode_cli.mode.chunked import chunked_mode_loss, peak_logits
from mode_cli.mode.terms import FINAL_ONLY, LossWeights
from mode_cli.train import memory
from mode_cli.train.fit import confirm_micro_batch
from mode_cli.train.memory import (
    GIB,
    MIB,
    Activations,
    Calibration,
    Growth,
    ModelFacts,
    Parameters,
    Setup,
    check_budget,
    largest_micro_batch,
    parse_size,
    plan_memory,
)

CAL = Calibration(
    runtime=100 * MIB,
    working_layers=2.0,
    slack=0.5,
    slack_checkpointed=0.25,
    slack_of="forward",
    dropout_mask_bytes=4,
    measured=True,
    tokenizer_per_entry=10.0,
)
CUDA = Calibration(
    runtime=512 * MIB,
    working_layers=1.0,
    slack=0.1,
    slack_checkpointed=0.1,
    slack_of="peak",
    dropout_mask_bytes=1,
    measured=False,
)


def facts(**changes) -> ModelFacts:
    """A made-up model with round numbers: 10 layers, hidden 1,000, vocab 32,000."""
    params = Parameters(
        quantized=64_000_000,
        quantized_tensors=70,
        largest_quantized=4_000_000,
        dense=50_000_000,
        decoder_layer=6_400_000,
        adapter=(1_000_000, 2_000, 3_000_000),
        head=4_000,
    )
    activations = Activations(
        layer=Growth(constant=1_000, per_token=40_000, per_row_square=4),
        outside=Growth(per_position=500, per_row=-2_000, per_token=3_000),
        dropout_mask_per_token=8_000,
        input_per_token=4_000,
    )
    base = dict(
        source="test",
        num_layers=10,
        hidden_size=1_000,
        vocab_size=32_000,
        params=params,
        activations=activations,
    )
    return ModelFacts(**{**base, **changes})


def setup(**changes) -> Setup:
    base = dict(
        micro_batch=4,
        seq_len=256,
        gradient_checkpointing=False,
        optimizer="adamw",
        precision="fp32",
        device="cpu",
        loss_weights=FINAL_ONLY,
        num_selected=1,
        routed=False,
    )
    return Setup(**{**base, **changes})


def test_every_line_of_the_plan_on_fixed_inputs():
    plan = plan_memory(facts(), setup(), calibration=CAL)
    line = {item.key: item.bytes for item in plan.items}
    assert line["weights_4bit"] == 32_000_000  # 4 bits a weight
    blocks = 64_000_000 / 64
    assert line["quant_state"] == blocks + 4 * blocks / 256 + 70 * (1 + 256 + 1 + 16) * 4
    assert line["dense"] == 50_000_000 * 4
    assert line["adapter"] == 4_002_000 * 4
    assert line["head"] == 4_000 * 4
    assert line["gradients"] == 4_006_000 * 4
    assert line["optimizer"] == 8 * 4_006_000
    tokens = 4 * 256
    layer = 1_000 + 40_000 * tokens + 4 * 4 * 256**2
    outside = 500 * 256 - 2_000 * 4 + 3_000 * tokens
    assert line["activations"] == 10 * layer + outside
    # final-only at 1,024 tokens: a [1024, V] block and one [1024, V] row, fp32.
    assert line["logits"] == 2 * 1_024 * 32_000 * 4
    assert line["loss_inputs"] == 2 * tokens * 1_000 * 4
    assert line["dequantized"] == 4_000_000 * 4
    assert line["tokenizer"] == 10 * 32_000
    assert line["runtime"] == 100 * MIB
    assert line["working"] == 2 * layer
    assert line["slack"] == 0.5 * 10 * layer
    assert plan.peak == sum(line.values())
    assert plan.phase == "end of forward"


def test_checkpointing_keeps_layer_inputs_and_recomputes_one_layer():
    plain = plan_memory(facts(), setup(), calibration=CAL)
    checkpointed = plan_memory(facts(), setup(gradient_checkpointing=True), calibration=CAL)
    tokens = 4 * 256
    outside = 500 * 256 - 2_000 * 4 + 3_000 * tokens
    layer = 1_000 + 40_000 * tokens + 4 * 4 * 256**2
    assert checkpointed.item("activations") == 10 * 4_000 * tokens + outside
    assert checkpointed.item("recomputed") + checkpointed.item("logits") in (
        layer,
        2 * 1_024 * 32_000 * 4,
    )
    assert checkpointed.peak < plain.peak
    # Checkpointing runs every layer's forward all the same: the slack is of the same basis.
    assert checkpointed.item("slack") == 0.25 * 10 * layer
    assert checkpointed.item("working") == plain.item("working") == 2 * layer


def test_cuda_keeps_one_byte_masks_and_its_slack_is_of_the_peak():
    cpu = plan_memory(facts(), setup(), calibration=CAL)
    cuda = plan_memory(facts(), setup(device="cuda"), calibration=CUDA)
    tokens = 4 * 256
    masks = 10 * 8_000 * tokens * 3 / 4  # 4 bytes a value measured, 1 on CUDA
    assert cpu.item("activations") - cuda.item("activations") == masks
    dynamic = cuda.item("activations") + cuda.item("logits") + cuda.item("loss_inputs")
    assert cuda.item("slack") == pytest.approx(0.1 * dynamic)
    assert cuda.item("runtime") == 512 * MIB


def test_optimizer_states_by_optimizer():
    p = facts().params
    assert memory.optimizer_bytes(p, "adamw") == 8 * 4_006_000
    # 8-bit: 2 bytes and a scale per 256 values, for tensors of at least 4,096 values.
    eight = 2 * 1_000_000 + 8 * (1_000_000 // 256 + 1) + 8 * 2_000 + 2 * 3_000_000
    eight += 8 * (3_000_000 // 256 + 1) + 8 * 4_000
    assert memory.optimizer_bytes(p, "paged_adamw_8bit") == eight


def test_per_process_under_ddp_and_fsdp():
    one = plan_memory(facts(), setup(), calibration=CAL)
    ddp = plan_memory(facts(), setup(processes=4), calibration=CAL)
    fsdp = plan_memory(facts(), setup(processes=4, strategy="fsdp"), calibration=CAL)
    # DDP: every process holds everything, plus the gradient buckets.
    assert ddp.item("buckets") == one.item("gradients")
    assert ddp.peak == one.peak + ddp.item("buckets")
    # FSDP2: a quarter of the weights, adapter, gradients and optimizer; the gathered units on top.
    for key in ("weights_4bit", "dense", "adapter", "gradients", "optimizer"):
        assert fsdp.item(key) == pytest.approx(one.item(key) / 4)
    assert fsdp.item("gathered") == 2 * 6_400_000 * 0.5 + one.item("dense") * 3 / 4
    assert fsdp.item("activations") == one.item("activations")


def test_unquantized_and_bf16_models():
    plan = plan_memory(
        facts(quantized=False, dense_bytes=2), setup(precision="bf16"), calibration=CAL
    )
    assert plan.item("weights_4bit") == 0 and plan.item("dequantized") == 0
    assert plan.item("dense") == (64_000_000 + 50_000_000) * 2
    assert plan.item("casts") == 4_002_000 * 2  # autocast's bf16 copies of the adapter


def test_peak_logits_is_what_the_chunked_loss_allocates(monkeypatch):
    """The plan's count of the loss's fp32 buffers against the buffers a call really makes."""
    sizes: list[int] = []
    original = chunked._Workspace.__call__

    def recording(self, name, *shape):
        buffer = original(self, name, *shape)
        sizes.append(sum(b.numel() for b in self.flat.values()))
        return buffer

    monkeypatch.setattr(chunked._Workspace, "__call__", recording)
    torch.manual_seed(0)
    vocab, hidden = 50, 8
    head = torch.nn.Linear(hidden, vocab, bias=False).requires_grad_(False)
    cases = [
        (FINAL_ONLY, 1, False),
        (LossWeights(), 3, True),  # mode: ensemble CE and distillation
        (LossWeights(distill=0.0), 3, True),  # mode-nodistill: the mixed states only
        (LossWeights(temperature=2.0), 3, True),
        (LossWeights(ensemble=0.0, layers=(0.2, 0.3, 0.5), distill=0.1), 3, False),  # layerwise
    ]
    for weights, selected, routed in cases:
        for tokens, budget in ((37, 10_000), (200, 6_000), (5, 10**9)):
            sizes.clear()
            normed = torch.randn(selected, tokens, hidden, requires_grad=True)
            mix = (
                torch.softmax(torch.randn(tokens, selected), -1).requires_grad_()
                if routed
                else None
            )
            labels = torch.randint(0, vocab, (tokens,))
            chunked_mode_loss(normed, mix, labels, head, weights, chunk_budget=budget)
            planned = peak_logits(weights, selected, vocab, routed, tokens, budget)
            assert max(sizes) == planned, (weights, tokens, budget)


def test_budgets_are_read_in_binary_units():
    assert parse_size("12GB") == 12 * GIB == parse_size("12 GiB") == parse_size("12g")
    assert parse_size("512MB") == 512 * MIB
    assert parse_size("1.5TiB") == 1.5 * 2**40
    assert parse_size("8e9") == 8e9


@pytest.mark.parametrize("text", ["-1GB", "lots", "0", "0GB", "12XB", "", "GB"])
def test_a_bad_budget_is_one_clear_message(text):
    with pytest.raises(ModeError) as err:
        parse_size(text)
    message = str(err.value)
    assert message.startswith(f"--memory={text!r}: expected") and "12GB" in message


def test_a_budget_below_the_weights_is_refused():
    weights = 32_000_000 + memory.weight_bytes(facts())["quant_state"] + 200_000_000
    check_budget(facts(), setup(), weights + 1)
    with pytest.raises(ModeError, match=r"below what the model's weights alone take \(22\d MiB"):
        check_budget(facts(), setup(), weights - 1)
    # Sharded over 4 processes, a quarter of the weights must fit.
    check_budget(facts(), setup(processes=4, strategy="fsdp"), weights / 3)


def test_the_largest_micro_batch_that_fits():
    budget = plan_memory(facts(), setup(micro_batch=6), calibration=CAL).peak + 1
    assert largest_micro_batch(facts(), setup(), budget, calibration=CAL) == 6
    # Only divisors of the batch, so that accumulation keeps it: 16 -> 4.
    assert largest_micro_batch(facts(), setup(), budget, batch_size=16, calibration=CAL) == 4
    tiny = plan_memory(facts(), setup(micro_batch=1), calibration=CAL).peak - 1
    assert largest_micro_batch(facts(), setup(), tiny, calibration=CAL) is None


def test_suggestions_name_each_change_with_its_saving():
    over = plan_memory(facts(), setup(micro_batch=8), calibration=CAL)
    budget = plan_memory(facts(), setup(micro_batch=2), calibration=CAL).peak + 1
    plan = plan_memory(facts(), setup(micro_batch=8), budget, calibration=CAL)
    assert plan.fits is False and plan.margin == pytest.approx(budget - over.peak)
    by_change = {s.change: s for s in plan.suggestions}
    checkpointing = by_change["train.gradient_checkpointing=true"]
    expected = plan_memory(
        facts(), setup(micro_batch=8, gradient_checkpointing=True), calibration=CAL
    )
    assert checkpointing.peak == expected.peak
    assert checkpointing.saving == over.peak - expected.peak
    # A smaller micro-batch keeps the batch through accumulation.
    assert "train.micro_batch_size=1 train.grad_accum_steps=8" in by_change
    assert by_change["train.micro_batch_size=4 train.grad_accum_steps=2"].fits is False
    assert "data.max_seq_len=128" in by_change
    fits = [s.fits for s in plan.suggestions]
    assert fits == sorted(fits, reverse=True)  # those that fit first


def test_when_no_change_fits_alone_one_combination_does():
    budget = (
        plan_memory(
            facts(), setup(micro_batch=1, gradient_checkpointing=True), calibration=CAL
        ).peak
        + 1
    )
    plan = plan_memory(facts(), setup(micro_batch=8), budget, calibration=CAL)
    assert not any(s.fits for s in plan.suggestions[:-1])
    combined = plan.suggestions[-1]
    assert combined.fits and combined.note == "together"
    assert combined.change.startswith("train.gradient_checkpointing=true train.micro_batch_size=")


def test_a_fitting_plan_suggests_nothing():
    plan = plan_memory(facts(), setup(), 100 * GIB, calibration=CAL)
    assert plan.fits and plan.suggestions == [] and plan.margin > 0


def test_auto_confirms_by_halving_on_out_of_memory():
    tried: list[int] = []

    def step(size: int) -> None:
        tried.append(size)
        if size > 3:
            raise torch.OutOfMemoryError("CUDA out of memory")

    assert confirm_micro_batch(step, 16) == 2
    assert tried == [16, 8, 4, 2]
    tried.clear()
    assert confirm_micro_batch(step, 12, batch_size=12) == 3  # divisors of the batch: 12 -> 6 -> 3
    assert tried == [12, 6, 3]
    retries = []
    confirm_micro_batch(step, 5, on_retry=lambda: retries.append(1))
    assert retries == [1]
    with pytest.raises(ModeError, match="a micro-batch of 1 ran out of memory"):
        confirm_micro_batch(lambda size: step(size + 10), 2)


def test_every_rank_halves_when_one_runs_out():
    """`agree` is the job's verdict: another rank's failure halves this one too."""
    outcomes = iter([True, False])
    assert confirm_micro_batch(lambda size: None, 8, agree=lambda failed: next(outcomes)) == 4


def test_the_plan_serialises():
    plan = plan_memory(facts(), setup(micro_batch=8), 1 * GIB, "--memory", calibration=CAL)
    record = plan.to_dict()
    assert record["fits"] is False and record["budget_bytes"] == GIB
    assert record["suggestions"] and record["items"][0]["key"] == "weights_4bit"
    assert replace(plan.setup, micro_batch=1).micro_batch == 1
