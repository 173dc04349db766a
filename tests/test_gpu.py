"""CUDA only (`pytest -m gpu`; skipped on a machine without a GPU): what the CPU suite checks
through its CPU twins, on the real kernels. `scripts/gpu_check.py` runs these on a GPU machine.

- bitsandbytes' CUDA 4-bit kernels: LoRA gradients equal a dequantized fp32 reference;
- bf16 on CUDA: the loss parts of a bf16 run match fp32's (as tests/test_precision.py on the CPU);
- paged 8-bit AdamW: its 8-bit state is saved in a checkpoint and a resumed run continues exactly;
- the CUDA RNG: restored from a checkpoint (dropout draws from it on the GPU);
- a real CUDA out-of-memory error ends in the message that names the memory settings.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers import records

from mode_cli.train import checkpoint as checkpoint_mod
from mode_cli.train import recipe as recipe_mod

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

CUDA = [
    "recipe=tiny-llama-alpaca",
    "train.device=cuda",
    "merge.enabled=false",
    "eval.compare_base=false",
    "eval.answers=off",
    "eval.max_examples=4",
]


def train(mode, out: Path, *overrides: str) -> tuple[int, str]:
    code, _, err = mode("train", *CUDA, f"output_dir={out}", *overrides)
    return code, " ".join(err.split())


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(run) if "loss" in r}


def test_cuda_4bit_lora_gradients_equal_a_dequantized_fp32_reference():
    from test_model import causal_loss, lora_cfg, lora_grads, randomise_lora, tiny_model_cfg

    from mode_cli.models import loading as loading_mod

    cfg = tiny_model_cfg()
    source = loading_mod.resolve_source(cfg)
    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(0)).cuda()

    def gradients(dequantized: bool) -> dict[str, torch.Tensor]:
        base = loading_mod.load_base_model(source, cfg, "fp32", "cuda")
        if dequantized:
            base = base.dequantize()
        model = loading_mod.attach_adapter(base, lora_cfg(), False)
        randomise_lora(model, seed=1)
        model.eval()
        with torch.no_grad():
            model(input_ids=ids)  # an eval pass first, as on the CPU
        model.train()
        causal_loss(model, ids).backward()
        return lora_grads(model)

    got, expected = gradients(dequantized=False), gradients(dequantized=True)
    assert got.keys() == expected.keys() and len(got) > 0
    assert next(iter(got.values())).is_cuda
    for name in got:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("loss", ["mode", "mode-nodistill", "final-only"])
def test_bf16_on_cuda_logs_fp32s_loss_parts(mode, tmp_path, loss):
    first = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        code, err = train(
            mode, out, f"loss={loss}", f"train.precision={precision}", "train.max_steps=2"
        )
        assert code == 0, err
        logged = records(out)
        assert all(math.isfinite(r["loss"]) for r in logged)
        first[precision] = {
            k: v for k, v in logged[0].items() if k == "loss" or k.startswith(("ce_", "distill"))
        }
    assert first["bf16"] == pytest.approx(first["fp32"], rel=2e-2)


def test_paged_8bit_adamw_state_and_the_cuda_rng_survive_checkpoint_and_resume(mode, tmp_path):
    """adapter.dropout draws from the CUDA generator every step; the optimizer keeps 8-bit
    states (bitsandbytes keeps 32-bit ones for tensors under 4,096 elements: rank 64 makes the
    tiny model's LoRA matrices large enough). A run stopped after 3 steps and resumed matches the
    uninterrupted run."""
    common = [
        "train.optimizer=paged_adamw_8bit",
        "train.precision=bf16",
        "adapter.r=64",
        "adapter.alpha=128",
        "adapter.dropout=0.1",
        "train.max_steps=6",
        "checkpoint.every_steps=1",
    ]
    full, split = tmp_path / "full", tmp_path / "split"
    code, err = train(mode, full, *common)
    assert code == 0, err
    code, err = train(mode, split, *common, "train.stop_after_steps=3")
    assert code == 0, err
    saved = torch.load(
        checkpoint_mod.complete_checkpoints(split)[-1] / "optimizer.pt", weights_only=True
    )
    states = [s.get("__bnb_optimizer_quant_state__", s) for s in saved["state"].values()]
    assert any(s["state1"].dtype == torch.uint8 and "absmax1" in s for s in states)
    code, err = train(mode, split, *common, "resume=auto")
    assert code == 0, err
    a, b = losses(full), losses(split)
    assert sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        assert b[step] == pytest.approx(a[step], rel=1e-5), step


def test_the_cuda_rng_state_round_trips():
    state = checkpoint_mod.rng_state("cuda:0")
    assert torch.equal(state["cuda"], torch.cuda.get_rng_state(0))  # this GPU's alone
    first = torch.rand(4, device="cuda:0")
    checkpoint_mod.set_rng_state(state, "cuda:0")
    torch.testing.assert_close(torch.rand(4, device="cuda:0"), first, rtol=0, atol=0)


def test_a_real_cuda_out_of_memory_names_the_memory_settings(mode, tmp_path, monkeypatch):
    """The allocator is capped just above what the loaded model holds, so the first step's
    forward runs out of memory for real; the run ends with the message, exit 2."""
    train_loop = recipe_mod.FinetuneRecipe.train
    total = torch.cuda.get_device_properties(0).total_memory

    def capped(self):
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_allocated() + 2**20) / total)
        return train_loop(self)

    monkeypatch.setattr(recipe_mod.FinetuneRecipe, "train", capped)
    try:
        code, err = train(mode, tmp_path / "run", "train.micro_batch_size=64")
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    assert code == 2
    assert "out of GPU memory on cuda:0 (" in err and "at step 1" in err
    assert "train.micro_batch_size (now 64" in err
    assert "Traceback" not in err
