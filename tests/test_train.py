"""`mode train` and `mode eval` end to end on tiny models: outputs, report, loss recipes."""

from __future__ import annotations

import json

import pytest
from helpers import records, train_tiny
from safetensors.torch import load_file

from mode_cli.eval.report import latest_report


def first_report(run):
    """The run's end-of-training report (later `mode eval` reports sort after it)."""
    return sorted((run / "eval").glob("*/report.json"))[0]


def test_a_run_writes_every_output(tiny_run):
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "mode_head.safetensors",
        "mode_head.json",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "adapter/tokenizer.json",
        "merged/config.json",
        "merged/model.safetensors",
        "merged/tokenizer.json",
    ):
        assert (tiny_run / name).is_file(), name
    # The end-of-training report: the first folder under eval/.
    report_dir = first_report(tiny_run).parent
    for name in ("report.json", "report.md", "layers.png"):
        assert (report_dir / name).is_file(), name
    steps = records(tiny_run)
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5]
    for record in steps:
        assert {
            "loss",
            "ce_ensemble",
            "distill",
            "lr",
            "tokens_per_s",
            "elapsed_s",
        } <= record.keys()
        assert record["loss"] > 0 and record["target_tokens"] > 0
    head = json.loads((tiny_run / "mode_head.json").read_text())
    assert head["layers"] == [2, 3, 4] and head["num_layers"] == 4 and head["router"] == "token"
    weights = load_file(str(tiny_run / "mode_head.safetensors"))
    assert set(weights) == {"norms.2.weight", "norms.3.weight", "router.weight", "router.bias"}


def test_the_report_has_one_entry_per_layer_plus_the_ensemble(tiny_run):
    report = json.loads(first_report(tiny_run).read_text())
    assert report["schema"] == {"name": "mode-report", "version": 4}
    assert [row["layer"] for row in report["layers"]] == [1, 2, 3, 4]
    assert [row["selected"] for row in report["layers"]] == [False, True, True, True]
    for row in report["layers"]:
        for side in ("base", "tuned"):
            metrics = row[side]
            assert metrics["loss"] > 0 and 0 <= metrics["top1"] <= 1
            assert metrics["perplexity"] == pytest.approx(2.718281828 ** metrics["loss"], rel=1e-6)
    assert report["ensemble"]["tuned"]["loss"] > 0 and report["ensemble"]["base"]["loss"] > 0
    weights = [row["router_weight"]["mean"] for row in report["layers"] if row["selected"]]
    assert sum(weights) == pytest.approx(1.0, abs=1e-6)
    assert report["layers"][0]["router_weight"] is None
    markdown = (first_report(tiny_run).parent / "report.md").read_text()
    assert "| ensemble |" in markdown and "| 4 * (final) |" in markdown


def test_mode_eval_reproduces_the_training_report(tiny_run, mode, tmp_path):
    before = json.loads(first_report(tiny_run).read_text())
    code, _, err = mode("eval", f"checkpoint={tiny_run}", "eval.answers=off")
    assert code == 0, err
    after = json.loads(latest_report(tiny_run).read_text())
    assert "ensemble" in err and "final layer eval loss" in err
    for old, new in zip(before["layers"], after["layers"], strict=True):
        assert new["tuned"]["loss"] == pytest.approx(old["tuned"]["loss"], rel=1e-5)
        assert new["base"]["loss"] == pytest.approx(old["base"]["loss"], rel=1e-5)
    assert after["ensemble"]["tuned"]["loss"] == pytest.approx(
        before["ensemble"]["tuned"]["loss"], rel=1e-5
    )


def test_mode_eval_rejects_what_is_not_a_run(mode, tmp_path):
    code, _, err = mode("eval", f"checkpoint={tmp_path}")
    assert code == 2 and "no config.yaml" in err
    code, _, err = mode("eval", f"checkpoint={tmp_path / 'missing'}")
    assert code == 2 and "not found" in err
    code, _, err = mode("eval")
    assert code == 2 and "checkpoint=DIR" in err


def test_training_lowers_the_loss(mode, tmp_path):
    out = tmp_path / "run"
    train_tiny(mode, out, "train.max_steps=40", "train.lr=5e-3", "eval.compare_base=false")
    losses = [r["loss"] for r in records(out)]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3


def test_final_only_is_plain_qlora_without_a_head(mode, tmp_path):
    out = tmp_path / "final"
    train_tiny(mode, out, "loss=final-only", "train.max_steps=3")
    assert not (out / "mode_head.safetensors").exists()
    report = json.loads(latest_report(out).read_text())
    assert report["ensemble"] is None and report["selected_layers"] == []
    assert {"ce_final", "loss"} <= records(out)[0].keys()
    code, _, err = mode("eval", f"checkpoint={out}", "eval.compare_base=false")
    assert code == 0, err


@pytest.mark.parametrize(
    "overrides",
    [
        ["loss=mode-nodistill", "layers=last2"],
        [
            "model.quantization=none",
            "layers=last4",
            "train.grad_accum_steps=2",
            "train.gradient_checkpointing=true",
        ],
    ],
    ids=["nodistill-last2", "no-quant-last4-accum-ckpt"],
)
def test_recipe_variants_train(mode, tmp_path, overrides):
    out = tmp_path / "variant"
    train_tiny(mode, out, "train.max_steps=2", "eval.max_examples=4", *overrides)
    assert len(records(out)) == 2


def test_layer_selection_is_checked_against_the_models_depth(mode, tmp_path):
    code, _, err = mode(
        "train", "recipe=tiny-llama-alpaca", f"output_dir={tmp_path / 'r'}", "layers.k=9"
    )
    assert code == 2
    assert "4 layers" in err and "layers.k=9" in err


def test_same_seed_same_losses(mode, tmp_path):
    runs = []
    for name in ("a", "b"):
        train_tiny(mode, tmp_path / name, "train.max_steps=3", "eval.compare_base=false")
        runs.append([r["loss"] for r in records(tmp_path / name)])
    assert runs[0] == runs[1]


def test_the_packaged_smollm2_trains_in_4_bits(mode, tmp_path, smollm2_conversion):
    """The demo's real pretrained model, briefly: NF4 load, LoRA + MoDE, report (no merge)."""
    out = tmp_path / "smollm2"
    code, _, err = mode(
        "train",
        "recipe=smollm2-arithmetic",
        f"output_dir={out}",
        "train.max_steps=2",
        "train.micro_batch_size=2",
        "merge=false",
        "data.max_eval_examples=4",
        "eval.max_new_tokens=8",
    )
    assert code == 0, err
    report = json.loads(latest_report(out).read_text())
    assert report["num_layers"] == 30 and report["selected_layers"] == [28, 29, 30]
    # A 135M base is below eval.answers_auto_max_params: answers are on by default, decoded from
    # a dequantized copy, for the base and both tuned heads.
    answers = report["answers"]
    assert answers["examples"] == 4 and answers["decoded_from"] == "dequantized"
    assert set(answers["heads"]) == {"final", "ensemble"} and set(answers["base"]) == {"final"}
    final = report["layers"][-1]
    # The logit lens of a real model: the final layer predicts far better than early layers.
    assert final["base"]["loss"] < report["layers"][20]["base"]["loss"]
    assert final["base"]["top1"] > 0.3


def test_train_final_norm_trains_saves_and_decodes_with_layer_ns_own_norm(mode, tmp_path):
    """layers.train_final_norm=true: layer N's trainable norm learns, is saved with the head, and
    comes back in `mode eval` (the same ensemble loss as at the end of training) and in `load`,
    whose ensemble decodes through it; the model's own final norm is untouched."""
    import torch

    from mode_cli import load
    from mode_cli.decode.ensemble import ensemble_of
    from mode_cli.models.families import final_norm

    out = tmp_path / "run"
    train_tiny(
        mode, out, "layers.train_final_norm=true", "train.max_steps=3", "train.head_lr=0.05",
        "eval.compare_base=false", "eval.max_examples=4",
    )  # fmt: skip
    assert json.loads((out / "mode_head.json").read_text())["train_final_norm"] is True
    saved = load_file(str(out / "mode_head.safetensors"))["norms.4.weight"]
    model, _ = load(out, device="cpu")
    own = final_norm(model).weight
    assert (saved - own.float()).abs().max() > 1e-3  # it learned; the model's norm did not
    torch.testing.assert_close(ensemble_of(model).head.norms["4"].weight, saved)

    before = json.loads(first_report(out).read_text())
    code, _, err = mode("eval", f"checkpoint={out}", "eval.answers=off", "eval.max_examples=4")
    assert code == 0, err
    after = json.loads(latest_report(out).read_text())
    assert after["ensemble"]["tuned"]["loss"] == pytest.approx(
        before["ensemble"]["tuned"]["loss"], rel=1e-5
    )
    assert after["layers"][-1]["tuned"]["loss"] == pytest.approx(
        before["layers"][-1]["tuned"]["loss"], rel=1e-5
    )
