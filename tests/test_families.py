"""Every supported model family, on tiny random-init models: the parts MoDE touches, then a run.

The contract the training code relies on (checked per family, no quantization): the decoder
gives N+1 hidden states, the last with the final norm applied, so `logit_fn(lm_head(hs[-1]))` is
the CausalLM's own logits; the final norm read as a logit lens works on every other layer; and the
MoDE head's copies of the final norm (Gemma's offset RMSNorm, GPT-NeoX's LayerNorm) compute
exactly what the original does. Then a QLoRA run per family through the CLI.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from omegaconf import OmegaConf
from peft import get_peft_model
from transformers import AutoModelForCausalLM

from mode_cli import files as files_mod
from mode_cli.config import TinyModelConfig
from mode_cli.mode.head import MoDEHead
from mode_cli.models import families as families_mod
from mode_cli.models import loading as loading_mod
from mode_cli.models import tiny as tiny_mod

# Family key (config.model_type, FAMILIES) -> recipe name, and the linear layers LoRA targets.
PROJ = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
FAMILIES = {
    "llama": ("llama", PROJ),
    "mistral": ("mistral", PROJ),
    "qwen2": ("qwen2", PROJ),
    "qwen3": ("qwen3", PROJ),
    "gemma": ("gemma", PROJ),
    "gemma2": ("gemma2", PROJ),
    "phi3": ("phi3", {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}),
    "gpt_neox": ("gpt-neox", {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}),
}
TIED = {"gemma", "gemma2"}
SPECIAL = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}


def test_the_table_covers_every_family_tested_here():
    assert set(families_mod.FAMILIES) == set(FAMILIES)


def test_each_family_recipe_is_the_tiny_llama_recipe_with_its_own_model():
    from pathlib import Path

    import yaml

    recipes = Path(__file__).resolve().parent.parent / "recipes"
    llama = yaml.safe_load((recipes / "tiny-llama-alpaca.yaml").read_text())
    for family, (name, _) in FAMILIES.items():
        recipe = recipes / f"tiny-{name}-alpaca.yaml"
        lines = recipe.read_text().splitlines()
        assert (
            lines[0].startswith("# ") and lines[1] == f"# Run: mode train recipe=tiny-{name}-alpaca"
        )
        expected = [
            {"model": f"tiny-{name}"} if d == {"model": "tiny-llama"} else d
            for d in llama["defaults"]
        ]
        assert yaml.safe_load(recipe.read_text()) == {**llama, "defaults": expected}
        model = yaml.safe_load((recipes / "model" / f"tiny-{name}.yaml").read_text())
        assert model["name_or_path"] == f"tiny:{family}"


def tiny_model(family: str):
    tiny = OmegaConf.structured(TinyModelConfig)
    config = tiny_mod.tiny_config(family, tiny, 512, SPECIAL)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_hidden_states_give_the_models_own_logits(family):
    model = tiny_model(family)
    config = model.config
    n = families_mod.num_layers(model)
    assert config.model_type == family and n == config.num_hidden_layers == 4
    assert config.pad_token_id < config.vocab_size and config.eos_token_id < config.vocab_size
    head = families_mod.lm_head(model)
    assert head is model.get_output_embeddings()
    assert (head.weight is model.get_input_embeddings().weight) == (family in TIED)
    norm = families_mod.final_norm(model)
    with torch.no_grad():
        # Random-init logits are tiny; scale the head so soft-capping (cap 30) changes them a lot.
        head.weight.mul_(300)
        # Random norm weights: Gemma's start at 0 (used as 1 + w), which would hide a bad copy.
        for param in norm.parameters():
            param.copy_(0.5 * torch.randn(param.shape))

    ids = torch.randint(1, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0  # right padding, as the collator pads
    with torch.no_grad():
        own = model(input_ids=ids, attention_mask=mask).logits
        states = families_mod.hidden_states(model, ids, mask)
    assert len(states) == n + 1

    fn = families_mod.logit_fn(model)
    assert (fn is not None) == (family == "gemma2")
    final = head(states[-1])
    torch.testing.assert_close(fn(final) if fn else final, own, rtol=1e-5, atol=1e-4)
    if fn is not None:
        assert final.abs().max() > 30 >= own.abs().max()  # the cap is really exercised
        assert model.config.final_logit_softcapping == 30.0

    # The MoDE head: its copies of the final norm compute exactly what the final norm does, and
    # every layer read through the final norm and the head (logit lens) gives finite logits.
    mode_head = MoDEHead(norm, layers=[2, 3, 4], num_layers=n, hidden_size=config.hidden_size)
    assert type(mode_head.norms["2"]) is type(norm)
    with torch.no_grad():
        normed = mode_head.normed(states)
        for i, layer in enumerate(mode_head.layers[:-1]):
            torch.testing.assert_close(normed[i], norm(states[layer]))
        for layer in range(1, n):
            lens = head(norm(states[layer]))
            lens = fn(lens) if fn else lens
            assert lens.shape == own.shape and torch.isfinite(lens).all()
        mixed = head(MoDEHead.mix(torch.stack(normed), mode_head.route(normed[-1])))
        assert torch.isfinite(mixed).all()
    if family in ("gemma", "gemma2"):
        x = torch.randn(3, config.hidden_size)
        expected = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps)
        torch.testing.assert_close(norm(x), expected * (1 + norm.weight))
        torch.testing.assert_close(mode_head.norms["2"](x), norm(x))

    # LoRA's all-linear and the explicit target list agree on the family's linear layers.
    assert set(loading_mod.linear_module_names(model)) == FAMILIES[family][1]
    peft_model = get_peft_model(
        model,
        loading_mod.peft_config(
            OmegaConf.create({"r": 2, "alpha": 4, "dropout": 0.0, "use_dora": False}), "all-linear"
        ),
    )
    targeted = peft_model.peft_config["default"].target_modules
    assert {name.rsplit(".", 1)[-1] for name in targeted} == FAMILIES[family][1]


@pytest.mark.parametrize("impl", ["chunked", "naive"])
@pytest.mark.parametrize("family", ["gemma2", "gpt_neox"])
def test_the_training_loss_is_the_models_own_cross_entropy(family, impl):
    """Final-only loss through `batch_loss` equals CE of the CausalLM's logits: soft-capping on."""
    import torch.nn.functional as F

    from mode_cli.mode.terms import LossWeights
    from mode_cli.train.steps import batch_loss

    model = tiny_model(family)
    with torch.no_grad():
        families_mod.lm_head(model).weight.mul_(300)  # logits well past the cap of 30
    ids = torch.randint(1, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 18:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :6] = -100  # a prompt
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    with torch.no_grad():
        sums = batch_loss(model, None, batch, LossWeights(), impl=impl)
        logits = model(input_ids=ids, attention_mask=mask).logits
    expected = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), reduction="sum"
    )
    assert sums.tokens == int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(sums.total, expected, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_qlora_run_per_family(family, mode, tmp_path):
    """3 NF4 + LoRA all-linear steps and the report; merging for a LayerNorm family (GPT-NeoX)
    and a tied-embedding one (Gemma), whose merged folders load in transformers as MoDE models of
    their family (tests/test_export.py holds every family's export to mode's ensemble)."""
    recipe, targets = FAMILIES[family]
    merge = family in ("gpt_neox", "gemma")
    out = tmp_path / "run"
    code, _, err = mode(
        "train",
        f"recipe=tiny-{recipe}-alpaca",
        "train.max_steps=3",
        f"merge={str(merge).lower()}",
        "eval.max_examples=4",
        f"output_dir={out}",
    )
    assert code == 0, err
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps] == [1, 2, 3] and all(r["loss"] > 0 for r in steps)
    from mode_cli.eval.report import latest_report

    report = json.loads(latest_report(out).read_text())
    assert [row["layer"] for row in report["layers"]] == [1, 2, 3, 4]
    for row in report["layers"]:
        assert row["tuned"]["loss"] > 0 and row["base"]["loss"] > 0
    assert report["ensemble"]["tuned"]["loss"] > 0
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert {name.rsplit(".", 1)[-1] for name in adapter["target_modules"]} == targets
    assert (out / "merged").exists() == merge
    if merge:
        merged = AutoModelForCausalLM.from_pretrained(out / "merged", trust_remote_code=True)
        assert merged.config.model_type == "mode" and merged.config.base_model_type == family
        assert (merged.lm_head.weight is merged.get_input_embeddings().weight) == (family in TIED)
        if family == "gemma":  # the embedding scale is a non-persistent buffer: restored on load
            scale = merged.get_input_embeddings().embed_scale
            assert scale.item() == pytest.approx(merged.config.hidden_size**0.5)
        ids = torch.tensor([[1, 2, 3, 4]])
        with torch.no_grad():
            assert torch.isfinite(merged(input_ids=ids).logits).all()


def test_an_unsupported_architecture_is_refused_with_the_supported_list(mode, tmp_path):
    from transformers import OPTConfig

    folder = tmp_path / "opt"
    config = OPTConfig(
        vocab_size=512,
        hidden_size=16,
        num_hidden_layers=1,
        ffn_dim=32,
        num_attention_heads=2,
        word_embed_proj_dim=16,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    for path in files_mod.resolve_bundled("bundled:tiny-tokenizer").iterdir():
        shutil.copy(path, folder / path.name)
    code, out, err = mode(
        "train",
        "recipe=tiny-llama-alpaca",
        f"model.name_or_path={folder}",
        f"output_dir={tmp_path / 'run'}",
    )
    assert code == 2
    message = " ".join((out + err).split())
    assert "Unsupported architecture 'opt'" in message
    assert "Supported: " + ", ".join(sorted(FAMILIES)) in message
