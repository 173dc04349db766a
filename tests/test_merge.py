"""The merged model: onto the dequantized or the original base, in the chosen dtype, carrying the
recipe; the `merge=true|false` shorthand; trust_remote_code reaching every from_pretrained. (What
the ensemble export holds and how engines load it: tests/test_export.py.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from omegaconf import OmegaConf
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from mode_cli.artifacts import HEAD_INFO, HEAD_WEIGHTS, MERGED_CONFIG, load_run_config
from mode_cli.errors import ModeError
from mode_cli.export.command import export_run
from mode_cli.models import loading as loading_mod
from mode_cli.recipes import compose_recipe, shipped_recipes_dir

IDS = torch.randint(0, 500, (2, 32), generator=torch.Generator().manual_seed(7))


def copy_run(run: Path, target: Path) -> Path:
    """What a merge reads from a run folder, copied so the shared run stays untouched."""
    target.mkdir()
    shutil.copytree(run / "adapter", target / "adapter")
    for name in ("config.yaml", HEAD_WEIGHTS, HEAD_INFO):
        if (run / name).is_file():
            shutil.copyfile(run / name, target / name)
    return target


def merge_copy(run: Path, tmp_path: Path, name: str, **merge) -> Path:
    """Merge a copy of `run` with `merge.*` set as given (a plain final-layer model unless
    `head` says otherwise); the merged folder."""
    out = copy_run(run, tmp_path / name)
    cfg = load_run_config(out)
    cfg.merge.head = "final"
    for key, value in merge.items():
        cfg.merge[key] = value
    return export_run(out, out / "merged", cfg, "cpu")


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model.eval()(input_ids=IDS).logits.float()


def test_merged_folder_carries_the_recipe_and_a_final_export_the_head(tiny_run, tmp_path):
    merged = tiny_run / "merged"
    recipe = OmegaConf.load(merged / MERGED_CONFIG)
    run_recipe = OmegaConf.load(tiny_run / "config.yaml")
    # The folder's recipe says what it holds: the ensemble, in the training dtype.
    assert (recipe.merge.head, recipe.merge.dtype) == ("ensemble", "fp32")
    recipe.merge.head, recipe.merge.dtype = run_recipe.merge.head, run_recipe.merge.dtype
    assert recipe == run_recipe
    # A final-layer export is a plain transformers model, with the head beside it for mode.
    final = merge_copy(tiny_run, tmp_path, "final")
    for name in (HEAD_WEIGHTS, HEAD_INFO):
        assert (final / name).read_bytes() == (tiny_run / name).read_bytes()
    model, info = AutoModelForCausalLM.from_pretrained(final, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights
    assert model.config.model_type == "llama"


def test_original_base_merge_equals_the_adapter_on_the_unquantized_base(tiny_run, tmp_path):
    merged = merge_copy(tiny_run, tmp_path, "original", base="original")
    cfg = load_run_config(tiny_run)
    source = loading_mod.resolve_source(cfg.model)
    original = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    base_logits = logits(original)
    expected = logits(PeftModel.from_pretrained(original, str(tiny_run / "adapter")))
    got = logits(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32))
    assert (got - expected).abs().max().item() < 1e-4
    assert (expected - base_logits).abs().max().item() > 1e-3  # the adapter moved the model
    # The dequantized merge (what the 4-bit training saw) differs from it by the NF4 rounding.
    dequantized = logits(AutoModelForCausalLM.from_pretrained(merge_copy(tiny_run, tmp_path, "dq")))
    assert (got - dequantized).abs().max().item() > 1e-3
    assert (
        getattr(AutoModelForCausalLM.from_pretrained(merged).config, "quantization_config", None)
        is None
    )


@pytest.mark.parametrize(
    ("base", "dtype", "torch_dtype", "tolerance"),
    [
        ("dequantized", "fp16", torch.float16, 2e-2),
        ("dequantized", "bf16", torch.bfloat16, 1e-1),
        ("original", "fp16", torch.float16, 2e-2),
    ],
)
def test_merge_dtype_sets_the_saved_weights_and_config(
    tiny_run, tmp_path, base, dtype, torch_dtype, tolerance
):
    merged = merge_copy(tiny_run, tmp_path, f"{base}-{dtype}", base=base, dtype=dtype)
    config = json.loads((merged / "config.json").read_text())
    assert config["dtype"] == str(torch_dtype).removeprefix("torch.")
    with safe_open(str(merged / "model.safetensors"), "pt") as weights:
        names = weights.keys()  # a safe_open handle is not iterable
        dtypes = {weights.get_slice(name).get_dtype() for name in names}
    assert dtypes == {"F16" if torch_dtype == torch.float16 else "BF16"}
    # Same model, rounded: its logits stay close to the fp32 merge onto the same base.
    reference = merge_copy(tiny_run, tmp_path, f"{base}-fp32", base=base, dtype="fp32")
    got = logits(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32))
    expected = logits(AutoModelForCausalLM.from_pretrained(reference, dtype=torch.float32))
    assert 0 < (got - expected).abs().max().item() < tolerance


def test_auto_dtype_is_the_training_compute_dtype(tiny_run):
    config = json.loads((tiny_run / "merged" / "config.json").read_text())
    assert load_run_config(tiny_run).train.precision == "fp32"
    assert config["dtype"] == "float32"


def test_merge_shorthand_and_its_errors(tmp_path):
    assert compose_recipe("tiny-llama-alpaca", ["merge=false"]).merge.enabled is False
    assert compose_recipe("tiny-llama-alpaca", ["merge=True"]).merge.enabled is True
    cfg = compose_recipe("tiny-llama-alpaca", ["merge.base=original", "merge.dtype=fp16"])
    assert (cfg.merge.enabled, cfg.merge.base, cfg.merge.dtype) == (True, "original", "fp16")
    with pytest.raises(ModeError, match="expected merge=true or merge=false"):
        compose_recipe("tiny-llama-alpaca", ["merge=sometimes"])
    with pytest.raises(ModeError, match="merge.base='nf4': expected one of dequantized, original"):
        from mode_cli.config import validate

        validate(compose_recipe("tiny-llama-alpaca", ["merge.base=nf4"]), check_hardware=False)
    # A recipe file cannot use the shell shorthand; the error says what to write.
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(
        "defaults:\n  - base\n  - model: tiny-llama\n  - data: arithmetic-sample\n  - _self_\n"
        "merge: false\n"
    )
    with pytest.raises(ModeError, match=r"merge: \{enabled: false\}"):
        compose_recipe(str(recipe))


def test_a_run_saved_before_merge_and_data_format_were_renamed_still_loads(tiny_run, tmp_path):
    run = tmp_path / "old"
    run.mkdir()
    saved = OmegaConf.load(tiny_run / "config.yaml")
    saved.merge = False
    saved.data.template = saved.data.pop("format")
    (run / "config.yaml").write_text(OmegaConf.to_yaml(saved))
    cfg = load_run_config(run)
    assert cfg.merge.enabled is False and cfg.merge.base == "dequantized"
    assert cfg.data.format == "alpaca"


def test_trust_remote_code_is_off_unless_a_recipe_sets_it():
    assert compose_recipe("tiny-llama-alpaca").model.trust_remote_code is False
    # No shipped recipe or group option turns it on.
    for path in sorted(shipped_recipes_dir().rglob("*.yaml")):
        assert "trust_remote_code" not in path.read_text(), path
    cfg = compose_recipe("tiny-llama-alpaca", ["model.trust_remote_code=true"])
    assert cfg.model.trust_remote_code is True


@pytest.mark.parametrize("trust", [False, True])
def test_trust_remote_code_reaches_every_from_pretrained_of_a_merge(
    tiny_run, tmp_path, monkeypatch, trust
):
    cfg = load_run_config(tiny_run)
    loading_mod.resolve_source(cfg.model)  # builds the cached tiny model before spying
    calls: list[tuple[str, dict]] = []

    def spy(cls_name: str, original):
        def from_pretrained(*args, **kwargs):
            calls.append((cls_name, kwargs))
            return original(*args, **kwargs)

        return from_pretrained

    for cls_name in ("AutoModelForCausalLM", "AutoTokenizer", "AutoConfig"):
        cls = getattr(transformers, cls_name)
        monkeypatch.setattr(cls, "from_pretrained", spy(cls_name, cls.from_pretrained))
    for base in ("dequantized", "original"):
        out = copy_run(tiny_run, tmp_path / base)
        cfg = load_run_config(out)
        cfg.model.trust_remote_code = trust
        cfg.merge.base = base
        export_run(out, out / "merged", cfg, "cpu")
    assert {name for name, _ in calls} >= {"AutoModelForCausalLM", "AutoTokenizer"}
    assert [kwargs.get("trust_remote_code") for _, kwargs in calls] == [trust] * len(calls)
