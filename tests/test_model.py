"""Model loading: NF4 on the CPU with exact LoRA gradients, LoRA targets, merged weights."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from peft import PeftModel
from transformers import AutoModelForCausalLM

from mode_cli.artifacts import load_merged, load_run_config
from mode_cli.config import AdapterConfig, ModelConfig
from mode_cli.errors import ModeError
from mode_cli.mode.loss import final_only_loss
from mode_cli.models import families as families_mod
from mode_cli.models import loading as loading_mod
from mode_cli.models.merging import dequantized_base


def tiny_model_cfg(**values):
    cfg = OmegaConf.merge(
        OmegaConf.structured(ModelConfig), {"name_or_path": "tiny:llama", **values}
    )
    return cfg


def lora_cfg(**values):
    return OmegaConf.merge(
        OmegaConf.structured(AdapterConfig), {"r": 4, "alpha": 8, "dropout": 0.0, **values}
    )


def causal_loss(model, ids):
    states = families_mod.hidden_states(model, ids, torch.ones_like(ids))
    sums = final_only_loss(
        states[-1][:, :-1].reshape(-1, states[-1].shape[-1]),
        ids[:, 1:].reshape(-1),
        families_mod.lm_head(model),
    )
    return sums.total / sums.tokens


def randomise_lora(model, seed: int) -> None:
    """LoRA's B starts at zero, which hides gradient errors in A: give both random values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}


def test_lora_gradients_after_an_eval_pass_equal_a_dequantized_fp32_reference():
    cfg = tiny_model_cfg()
    source = loading_mod.resolve_source(cfg)
    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(0))

    quantized = loading_mod.attach_adapter(
        loading_mod.load_base_model(source, cfg, "fp32", "cpu"), lora_cfg(), False
    )
    randomise_lora(quantized, seed=1)
    # A no-grad forward in eval mode (as in evaluation or generate()) used to repack
    # bitsandbytes' CPU weights onto a path without backward: gradients must survive it.
    quantized.eval()
    with torch.no_grad():
        quantized(input_ids=ids)
    quantized.train()
    causal_loss(quantized, ids).backward()
    got = lora_grads(quantized)

    base = loading_mod.load_base_model(source, cfg, "fp32", "cpu").dequantize()
    reference = loading_mod.attach_adapter(base, lora_cfg(), False)
    randomise_lora(reference, seed=1)
    reference.train()
    causal_loss(reference, ids).backward()
    expected = lora_grads(reference)

    assert got.keys() == expected.keys() and len(got) > 0
    for name in got:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_bf16_lora_gradients_are_unchanged_by_an_eval_pass():
    """train.precision=bf16 on the CPU: the 4-bit layers compute in bf16 under CPU autocast, and a
    no-grad eval forward before training must not move them onto the path without backward (it
    did without the guard: gradients 125% off)."""
    cfg = tiny_model_cfg()
    source = loading_mod.resolve_source(cfg)
    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(0))

    def gradients(eval_pass: bool) -> dict[str, torch.Tensor]:
        model = loading_mod.attach_adapter(
            loading_mod.load_base_model(source, cfg, "bf16", "cpu"), lora_cfg(), False
        )
        randomise_lora(model, seed=1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if eval_pass:
                model.eval()
                with torch.no_grad():
                    model(input_ids=ids)
            model.train()
            loss = causal_loss(model, ids)
        loss.backward()
        return lora_grads(model)

    expected, got = gradients(eval_pass=False), gradients(eval_pass=True)
    assert got.keys() == expected.keys() and len(got) > 0
    for name in got:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)


def test_quantization_none_loads_plain_weights():
    cfg = tiny_model_cfg(quantization="none")
    model = loading_mod.load_base_model(loading_mod.resolve_source(cfg), cfg, "fp32", "cpu")
    assert not getattr(model, "is_loaded_in_4bit", False)
    assert all(not p.requires_grad for p in model.parameters())
    assert families_mod.num_layers(model) == 4


@pytest.mark.parametrize("quantization", ["nf4", "none"])
def test_a_model_loaded_on_the_cpu_leaves_its_file_unmapped(quantization):
    """fp32 weights loaded in fp32 are views of the mapped safetensors file, which would then
    stay mapped (and resident) for the model's life: the loader copies them."""
    from pathlib import Path

    maps = Path("/proc/self/maps")
    if not maps.is_file():
        pytest.skip("reads /proc/self/maps (Linux)")
    cfg = tiny_model_cfg(quantization=quantization)
    source = loading_mod.resolve_source(cfg)
    model = loading_mod.load_base_model(source, cfg, "fp32", "cpu")
    mapped = [line for line in maps.read_text().splitlines() if str(source) in line]
    assert mapped == []
    assert families_mod.num_layers(model) == 4


def test_unknown_lora_target_names_the_modules_that_exist():
    cfg = tiny_model_cfg()
    model = loading_mod.load_base_model(loading_mod.resolve_source(cfg), cfg, "fp32", "cpu")
    with pytest.raises(ModeError, match="nope") as err:
        loading_mod.attach_adapter(model, lora_cfg(target_modules=["q_proj", "nope"]), False)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert name in str(err.value)
    assert "lm_head" not in str(err.value)


def test_tiny_models_are_deterministic_and_cached():
    cfg = tiny_model_cfg()
    first = loading_mod.resolve_source(cfg)
    assert loading_mod.resolve_source(cfg) == first
    other = loading_mod.resolve_source(tiny_model_cfg(tiny={"seed": 1}))
    assert other != first
    a = AutoModelForCausalLM.from_pretrained(first)
    b = AutoModelForCausalLM.from_pretrained(other)
    assert not torch.equal(a.lm_head.weight, b.lm_head.weight)


def test_missing_local_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ModeError, match="not found"):
        loading_mod.resolve_source(tiny_model_cfg(name_or_path=str(tmp_path / "nothing-here")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModeError, match="no config.json"):
        loading_mod.resolve_source(tiny_model_cfg(name_or_path=str(tmp_path / "empty")))


def test_merged_model_equals_the_adapter_on_the_dequantized_base(tiny_run):
    assert_merged_matches_adapter(tiny_run)


def test_merged_dora_equals_the_adapter_on_the_dequantized_base(mode, tmp_path):
    out = tmp_path / "dora"
    code, _, err = mode(
        "train",
        "recipe=tiny-llama-alpaca",
        "adapter=dora-small",
        f"output_dir={out}",
        "train.max_steps=5",
        "eval.max_examples=4",
    )
    assert code == 0, err
    assert_merged_matches_adapter(out)


def assert_merged_matches_adapter(tiny_run):
    """The merged weights (read from the ensemble export as the base family's model) equal the
    adapter on the dequantized base."""
    cfg = load_run_config(tiny_run)
    dense = load_run_config(tiny_run)
    dense.model.quantization = "none"
    merged = load_merged(tiny_run / "merged", dense, "cpu")[0].eval()
    source = loading_mod.resolve_source(cfg.model)
    base = dequantized_base(cfg, source, "cpu")
    ids = torch.randint(0, 500, (2, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
        adapted = PeftModel.from_pretrained(base, str(tiny_run / "adapter")).eval()
        expected = adapted(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    assert (got - expected).abs().max().item() < 1e-3
    # The adapter moved the model, so the comparison above is not trivially true.
    assert (expected - base_logits).abs().max().item() > 1e-3
    assert getattr(merged.config, "quantization_config", None) is None
