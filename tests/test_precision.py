"""bf16 on the CPU: the GPU recipe's precision path (bf16 autocast around the forward, 4-bit layers
computing in bf16, the loss in fp32) run in CI through torch's CPU autocast.

Every loss recipe trains on tiny-llama in fp32 and in bf16 from the same seed, and one soft-capped
family (Gemma 2) does too; the loss parts logged at step 1 must agree. The tolerance: the decoder
runs in bf16 under autocast, so the states reaching the loss carry bf16 rounding (2^-8 relative
per operation) through every layer, while the loss itself computes in fp32. 2% is the acceptance
bound on the distillation part, the term most sensitive to it (a KL between late layers, a
difference of two sums of size ~log V); with the loss computing under autocast, bf16's distill part
fell far outside it, and loss=mode-nodistill crashed.
"""

from __future__ import annotations

import math

import pytest
from helpers import records, train_tiny

QUICK = ["train.max_steps=2", "eval.max_examples=2", "eval.compare_base=false", "eval.answers=off"]
LOSSES = [
    "mode",
    "mode-nodistill",
    "final-only",
    "layerwise",
    "layerwise-rotational",
    "layerwise-gradual",
    "mode-only",
]
CASES = [("tiny-llama-alpaca", loss) for loss in LOSSES] + [("tiny-gemma2-alpaca", "mode")]


@pytest.mark.parametrize(("recipe", "loss"), CASES, ids=[f"{r}-{loss}" for r, loss in CASES])
def test_every_loss_recipe_trains_in_bf16_and_logs_fp32s_parts(mode, tmp_path, recipe, loss):
    first = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        train_tiny(mode, out, f"loss={loss}", f"train.precision={precision}", *QUICK, recipe=recipe)
        logged = records(out)
        assert [r["step"] for r in logged] == [1, 2]
        assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in logged)
        first[precision] = {
            k: v for k, v in logged[0].items() if k == "loss" or k.startswith(("ce_", "distill"))
        }
    fp32, bf16 = first["fp32"], first["bf16"]
    assert bf16.keys() == fp32.keys() and len(fp32) >= 2
    assert bf16 == pytest.approx(fp32, rel=2e-2)
