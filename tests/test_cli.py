"""Tests of the `mode` command line and the recipes: help, listing, composing, overrides, the
errors a user can cause, user recipes, dry runs and CPU smoke runs of the GPU recipes."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from helpers import run_command
from omegaconf import OmegaConf

from mode_cli import __version__
from mode_cli.config import validate
from mode_cli.errors import ModeError
from mode_cli.files import BUNDLED_DIR
from mode_cli.recipes import compose_recipe, shipped_recipes_dir
from mode_cli.train.optim import GPU_ONLY_OPTIMIZERS

REPO = Path(__file__).resolve().parent.parent
RECIPES = shipped_recipes_dir()
MODE_BIN = Path(sys.executable).parent / "mode"
SHIPPED = sorted(p.stem for p in RECIPES.glob("*.yaml"))
GROUPS = ("model", "data", "adapter", "layers", "router", "loss", "train", "eval")
SMOKE = [
    "model=tiny-llama",
    "data=arithmetic-sample",
    "train=cpu-smoke",
    "eval.max_examples=4",
    "merge=false",
]
USER_RECIPE = """\
# My own recipe: shipped groups, one group option of my own.
defaults:
  - base
  - model: tiny-llama
  - data: arithmetic-sample
  - adapter: lora-small
  - layers: last2
  - loss: mode
  - train: my-fast
  - eval: default
  - _self_

data:
  max_train_examples: 8
"""
USER_TRAIN_OPTION = """\
# Seven quick steps.
device: cpu
precision: fp32
optimizer: adamw
max_steps: 7
micro_batch_size: 2
threads: 1
"""


def flat(text: str) -> str:
    """Output with rich's line wrapping undone: every run of whitespace is one space."""
    return " ".join(text.split())


def first_comment(path: Path) -> str:
    return path.read_text().splitlines()[0].lstrip("#").strip()


def is_gpu_recipe(name: str) -> bool:
    train = compose_recipe(name).train
    return train.device == "cuda" or train.optimizer in GPU_ONLY_OPTIMIZERS


GPU_RECIPES = [name for name in SHIPPED if is_gpu_recipe(name)]


@pytest.fixture(autouse=True)
def _wide_terminal(monkeypatch):
    # Rich wraps at 80 columns when not a terminal; a wide one keeps each message on its lines.
    monkeypatch.setenv("COLUMNS", "400")


@pytest.fixture
def no_cuda():
    if torch.cuda.is_available():
        pytest.skip("checks how a GPU recipe is refused on a machine without CUDA")


def run_exit(capsys, *args: str) -> tuple[int, str, str]:
    """`mode ARGS` where argparse exits itself (--help, --version)."""
    from mode_cli.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def assert_user_error(code: int, err: str) -> str:
    """One clean error message, exit 2, no traceback; returns the message, unwrapped."""
    assert code == 2
    assert "Traceback" not in err
    assert err.count("error:") == 1
    return flat(err)


# ---------------------------------------------------------------------------- help


def test_version(capsys):
    code, out, _ = run_exit(capsys, "--version")
    assert code == 0
    assert out.strip() == f"mode {__version__}"


def test_help_lists_the_commands(capsys):
    code, out, _ = run_exit(capsys, "--help")
    assert code == 0
    assert out.startswith("usage: mode")
    for command in ("train", "eval", "recipes"):
        assert re.search(rf"^\s+{command}\s+\S", out, re.M), command


def test_no_command_prints_help(mode):
    code, out, _ = mode()
    assert code == 0
    assert out.startswith("usage: mode")


def test_train_help_lists_every_group_and_option(capsys):
    code, out, _ = run_exit(capsys, "train", "--help")
    assert code == 0
    assert "--dry-run" in out and "--recipes-dir" in out
    assert re.search(r"^\s+layers\s+.*last2, last3, last4", out, re.M)
    for group in GROUPS:
        options = sorted(p.stem for p in (RECIPES / group).glob("*.yaml"))
        assert options, group
        assert re.search(rf"^\s+{group}\s+{re.escape(', '.join(options))}$", out, re.M), group
    assert f"recipes: {', '.join(SHIPPED)}" in out


@pytest.mark.parametrize("argv", [["recipes"], ["recipes", "list"]])
def test_recipes_lists_every_recipe_with_its_description(mode, argv):
    code, out, _ = mode(*argv)
    assert code == 0
    assert len(SHIPPED) >= 3
    for name in SHIPPED:
        description = first_comment(RECIPES / f"{name}.yaml")
        assert description
        assert re.search(rf"{re.escape(name)}[\s│|]+{re.escape(description)}", out), name


# ---------------------------------------------------------------------------- errors


def test_train_without_recipe(mode):
    code, _, err = mode("train")
    assert "mode train needs recipe=NAME" in assert_user_error(code, err)


def test_unknown_recipe_lists_the_available_ones(mode):
    code, out, err = mode("train", "recipe=does-not-exist")
    message = assert_user_error(code, err)
    assert "Unknown recipe 'does-not-exist'" in message
    assert f"Available recipes: {', '.join(SHIPPED)}" in message
    assert out == ""


def test_bad_value_names_the_key_and_the_expected_type(mode):
    code, _, err = mode("train", "recipe=tiny-llama-alpaca", "train.lr=abc")
    message = assert_user_error(code, err)
    assert "Invalid value for 'train.lr'" in message
    assert "'abc'" in message
    assert "float" in message.lower()


@pytest.mark.parametrize(
    ("override", "key", "where"),
    [
        ("not_a_key=1", "not_a_key", "Keys at the top level: recipe, output_dir, merge, model,"),
        ("train.not_a_key=1", "train.not_a_key", "Keys in 'train': device, precision, optimizer,"),
    ],
)
def test_unknown_key_is_named(mode, override, key, where):
    code, _, err = mode("train", "recipe=tiny-llama-alpaca", override)
    message = assert_user_error(code, err)
    assert f"Unknown config key '{key}'." in message
    assert where in message


def test_unknown_group_option_names_the_options(mode):
    code, _, err = mode("train", "recipe=tiny-llama-alpaca", "model=zzz")
    message = assert_user_error(code, err)
    assert "No config option 'model/zzz'" in message
    models = " ".join(sorted(p.stem for p in (RECIPES / "model").glob("*.yaml")))
    assert f"Available options in 'model': {models}" in message
    assert "tiny-llama" in models and "llama3-8b" in models


def test_error_message_has_no_literal_markup(mode):
    code, _, err = mode("train", "recipe=does-not-exist")
    assert code == 2
    assert "[bold red]" not in err
    assert err.startswith("error: Unknown recipe")


def test_unknown_lora_target_is_refused_in_a_dry_run(mode, tmp_path):
    code, _, err = mode(
        "train",
        "recipe=tiny-llama-alpaca",
        "adapter.target_modules=[nope]",
        f"output_dir={tmp_path / 'out'}",
        "--dry-run",
    )
    message = assert_user_error(code, err)
    assert "adapter.target_modules: nope match no module of this model" in message
    assert "q_proj" in message and "down_proj" in message
    assert not (tmp_path / "out").exists()


def test_unknown_lora_target_is_refused_in_a_run(mode, tmp_path):
    out = tmp_path / "out"
    code, _, err = mode(
        "train",
        "recipe=tiny-llama-alpaca",
        "adapter.target_modules=[q_proj,nope]",
        f"output_dir={out}",
        "train.max_steps=1",
    )
    message = assert_user_error(code, err)
    assert "adapter.target_modules: nope match no module of this model" in message
    assert "Linear modules: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj" in (
        message
    )
    assert not (out / "metrics.jsonl").exists()
    assert not (out / "adapter").exists()


def test_a_run_that_fails_at_setup_can_be_retried_in_the_same_folder(mode, tmp_path):
    out = tmp_path / "out"
    code, _, _ = mode(
        "train", "recipe=tiny-llama-alpaca", "adapter.target_modules=[nope]", f"output_dir={out}"
    )
    assert code == 2
    assert not (out / "config.yaml").exists()


def test_validate_reports_every_problem_at_once(mode):
    overrides = ["adapter.r=0", "train.micro_batch_size=0", "loss.name=bogus"]
    cfg = compose_recipe("tiny-llama-alpaca", overrides)
    with pytest.raises(ModeError) as err:
        validate(cfg, check_hardware=False)
    assert str(err.value) == (
        "Invalid recipe:\n"
        "  - loss.name='bogus': expected one of mode, mode-nodistill, final-only, layerwise, "
        "mode-only\n"
        "  - adapter.r=0: expected a number > 0\n"
        "  - train.micro_batch_size=0: expected a whole number >= 1 or auto"
    )

    code, _, err_text = mode("train", "recipe=tiny-llama-alpaca", *overrides, "--dry-run")
    message = assert_user_error(code, err_text)
    assert flat(str(err.value)) in message


def test_existing_run_folder_is_refused_and_left_untouched(mode, tmp_path):
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "config.yaml").write_text("recipe: earlier\n")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (run / "adapter" / "adapter_config.json").write_text("{}")
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()}

    code, _, err = mode("train", "recipe=tiny-llama-alpaca", f"output_dir={run}")

    message = assert_user_error(code, err)
    assert "already holds a run; pick another output_dir (nothing was changed)" in message
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in run.iterdir()) == ["adapter", "config.yaml", "metrics.jsonl"]


# ---------------------------------------------------------------------------- shipped recipes


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_recipe_composes_and_validates(mode, name):
    validate(compose_recipe(name), check_hardware=False)
    code, out, err = mode("recipes", "show", name)
    assert code == 0, err
    shown = yaml.safe_load(out)
    assert shown["recipe"] == name
    assert shown["model"]["name_or_path"]
    # Every group fills the section of its own name.
    assert set(GROUPS) <= set(shown)


def test_show_llama3_recipe(mode):
    code, out, _ = mode("recipes", "show", "llama3-8b-alpaca")
    assert code == 0
    shown = yaml.safe_load(out)
    assert shown["model"]["name_or_path"] == "meta-llama/Meta-Llama-3-8B"
    assert shown["model"]["quantization"] == "nf4"
    assert shown["train"]["optimizer"] == "paged_adamw_8bit"
    assert shown["train"]["precision"] == "bf16"
    assert shown["train"]["device"] == "cuda"
    assert shown["adapter"]["r"] == 16
    assert shown["layers"]["k"] == 3
    assert shown["data"]["max_seq_len"] == 2048


def test_show_applies_overrides(mode):
    code, out, _ = mode("recipes", "show", "tiny-llama-alpaca", "layers=last4", "train.lr=1e-4")
    assert code == 0
    shown = yaml.safe_load(out)
    assert shown["layers"]["k"] == 4
    assert shown["train"]["lr"] == pytest.approx(1e-4)


def test_the_gpu_recipes_are_found():
    assert "llama3-8b-alpaca" in GPU_RECIPES
    assert "tiny-llama-alpaca" not in GPU_RECIPES


def _no_hub(*args, **kwargs):
    raise AssertionError("the hub was reached before validation refused the recipe")


def test_gpu_recipe_is_refused_on_a_cpu_before_any_hub_access(mode, monkeypatch, no_cuda):
    import mode_cli.train.recipe  # noqa: F401  (imported up front: only the refusal is timed)

    monkeypatch.setattr("mode_cli.data.sources.Reader.dataset", _no_hub)
    monkeypatch.setattr("mode_cli.train.recipe.resolve_source", _no_hub)
    monkeypatch.setattr("mode_cli.train.recipe.load_tokenizer", _no_hub)
    start = time.perf_counter()

    code, out, err = mode("train", "recipe=llama3-8b-alpaca", "--dry-run")

    assert time.perf_counter() - start < 10
    message = assert_user_error(code, err)
    assert "Invalid recipe: - train.device=cuda: torch sees no CUDA GPU on this machine" in message
    assert out == ""


def test_gpu_recipe_refusal_names_the_gpu_only_settings(mode, no_cuda):
    code, _, err = mode("train", "recipe=llama3-8b-alpaca", "--dry-run")
    message = assert_user_error(code, err)
    assert "train.optimizer=paged_adamw_8bit" in message
    assert "precision" not in message  # bf16 runs on the CPU too (CPU autocast)


def test_gpu_only_settings_are_named_on_a_cpu_device(mode, no_cuda):
    code, _, err = mode("train", "recipe=llama3-8b-alpaca", "train.device=cpu", "--dry-run")
    message = assert_user_error(code, err)
    assert "train.optimizer=paged_adamw_8bit needs a CUDA GPU" in message
    assert "precision" not in message


@pytest.mark.parametrize("name", GPU_RECIPES)
def test_gpu_recipe_smoke_trains_on_the_cpu(mode, tmp_path, name):
    out = tmp_path / "run"
    code, _, err = mode("train", f"recipe={name}", *SMOKE, f"output_dir={out}")
    assert code == 0, err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["loss"] > 0 for r in records)
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] > 0
    from mode_cli.eval.report import latest_report

    report = json.loads(latest_report(out).read_text())
    assert report
    assert (latest_report(out).parent / "report.md").is_file()
    assert not (out / "merged").exists()
    config = OmegaConf.load(out / "config.yaml")
    assert config.recipe == name
    assert config.model.name_or_path == "tiny:llama"
    assert config.train.optimizer == "adamw"


# ---------------------------------------------------------------------------- own recipes


def test_recipes_cp_copies_and_refuses_to_overwrite(mode, tmp_path):
    target = tmp_path / "mine.yaml"
    code, out, _ = mode("recipes", "cp", "tiny-llama-alpaca", str(target))
    assert code == 0
    assert "copied tiny-llama-alpaca" in flat(out)
    original = (RECIPES / "tiny-llama-alpaca.yaml").read_text()
    assert target.read_text() == original

    target.write_text(original + "\ntrain:\n  max_steps: 2\n")
    edited = target.read_text()
    code, _, err = mode("recipes", "cp", "tiny-llama-alpaca", str(target))
    assert "Refusing to overwrite" in assert_user_error(code, err)
    assert target.read_text() == edited

    code, out, _ = mode("recipes", "show", str(target))
    assert code == 0
    shown = yaml.safe_load(out)
    assert (shown["recipe"], shown["train"]["max_steps"]) == ("mine", 2)


def test_recipes_cp_into_a_folder(mode, tmp_path):
    code, _, _ = mode("recipes", "cp", "llama3-8b-alpaca", str(tmp_path))
    assert code == 0
    assert (tmp_path / "llama3-8b-alpaca.yaml").read_text() == (
        RECIPES / "llama3-8b-alpaca.yaml"
    ).read_text()


def test_recipes_cp_refuses_a_non_yaml_destination(mode, tmp_path):
    code, _, err = mode("recipes", "cp", "tiny-llama-alpaca", str(tmp_path / "mine.txt"))
    assert "Destination must be a folder or a .yaml file" in assert_user_error(code, err)
    assert not (tmp_path / "mine.txt").exists()


def test_yml_recipes_are_refused_with_a_clear_message(mode, tmp_path):
    # Hydra only reads .yaml: accepting .yml would fail later with a confusing message.
    code, _, err = mode("recipes", "cp", "tiny-llama-alpaca", str(tmp_path / "mine.yml"))
    assert ".yaml" in assert_user_error(code, err)
    assert not (tmp_path / "mine.yml").exists()
    (tmp_path / "other.yml").write_text("defaults:\n  - base\n")
    code, _, err = mode("train", f"recipe={tmp_path / 'other.yml'}", "--dry-run")
    assert "must end in .yaml" in assert_user_error(code, err)


def test_copied_recipe_dry_runs(mode, tmp_path):
    target = tmp_path / "mine.yaml"
    assert mode("recipes", "cp", "tiny-llama-alpaca", str(target))[0] == 0
    code, _, err = mode("train", f"recipe={target}", "--dry-run")
    assert code == 0, err
    assert "dry run: recipe valid, data ready; no training done" in flat(err)


@pytest.fixture
def user_recipes(tmp_path) -> Path:
    folder = tmp_path / "my-recipes"
    (folder / "train").mkdir(parents=True)
    (folder / "mine.yaml").write_text(USER_RECIPE)
    (folder / "train" / "my-fast.yaml").write_text(USER_TRAIN_OPTION)
    return folder


def test_user_recipes_dir_uses_shipped_groups_and_its_own(mode, user_recipes):
    code, out, err = mode("recipes", "show", "mine", "--recipes-dir", str(user_recipes))
    assert code == 0, err
    shown = yaml.safe_load(out)
    assert shown["recipe"] == "mine"
    assert shown["model"]["name_or_path"] == "tiny:llama"  # shipped group
    assert shown["layers"]["k"] == 2  # shipped group
    assert shown["train"]["max_steps"] == 7  # the user's own option
    assert shown["data"]["max_train_examples"] == 8  # the recipe's own value

    code, _, err = mode("train", "recipe=mine", "--recipes-dir", str(user_recipes), "--dry-run")
    assert code == 0, err
    assert "train: 8 examples from 8 rows" in flat(err)


def test_user_recipes_dir_lists_its_recipes(mode, user_recipes):
    code, out, _ = mode("recipes", "--recipes-dir", str(user_recipes))
    assert code == 0
    assert re.search(r"mine[\s│|]+My own recipe: shipped groups, one group option of my own\.", out)


def test_user_recipes_dir_still_finds_shipped_recipes(mode, user_recipes):
    code, out, _ = mode("recipes", "show", "tiny-llama-alpaca", "--recipes-dir", str(user_recipes))
    assert code == 0
    assert yaml.safe_load(out)["recipe"] == "tiny-llama-alpaca"

    code, _, err = mode("train", "recipe=nope", "--recipes-dir", str(user_recipes))
    message = assert_user_error(code, err)
    assert "Available recipes: llama3-8b-alpaca, mine, smollm2-arithmetic" in message


def test_recipes_cp_honours_recipes_dir(mode, user_recipes, tmp_path):
    target = tmp_path / "copy.yaml"
    code, _, err = mode("recipes", "cp", "mine", str(target), "--recipes-dir", str(user_recipes))
    assert code == 0, err
    assert target.read_text() == USER_RECIPE


BAD_KEY_RECIPE = """\
defaults:
  - base
  - model: tiny-llama
  - data: arithmetic-sample
  - _self_

train:
  not_a_key: 1
"""


def test_user_recipe_with_an_unknown_key_names_it_in_the_friendly_message(mode, tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(BAD_KEY_RECIPE)
    code, _, err = mode("train", f"recipe={recipe}", "--dry-run")
    message = assert_user_error(code, err)
    assert "not_a_key" in message
    assert "train.not_a_key" in message
    assert "Unknown config key 'train.not_a_key'. Keys in 'train': device," in message


def test_user_recipe_without_base_is_refused(mode, tmp_path):
    recipe = tmp_path / "nobase.yaml"
    recipe.write_text("defaults:\n  - model: tiny-llama\n  - _self_\n")
    code, _, err = mode("train", f"recipe={recipe}", "--dry-run")
    message = assert_user_error(code, err)
    assert "Recipe 'nobase' does not build on the schema" in message
    assert "`- base`" in message


def test_missing_recipe_file(mode, tmp_path):
    code, _, err = mode("train", f"recipe={tmp_path / 'nope.yaml'}")
    assert "Recipe file not found" in assert_user_error(code, err)


# ---------------------------------------------------------------------------- dry run


def test_dry_run_shows_an_example_and_counts_and_writes_nothing(mode, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = mode("train", "recipe=tiny-llama-alpaca", "--dry-run")
    assert code == 0, err
    text = flat(err)

    first = json.loads((BUNDLED_DIR / "arithmetic" / "train.jsonl").read_text().splitlines()[0])
    assert "example (alpaca) (dim: prompt, masked; [[trained]]: response, trained):" in text
    assert flat(f"### Instruction:\n{first['instruction']}\n\n### Response:\n") in text
    assert flat(f"### Response:\n[[{first['output']}<|endoftext|>]]") in text
    assert text.count("[[") == 2  # the legend and the one trained span

    assert re.search(
        r"train: 64 examples from 64 rows, [\d,]+ tokens \([\d,]+ trained\); \d+ truncated at "
        r"data\.max_seq_len=128, 0 dropped with no response left, 0 bad rows skipped",
        text,
    )
    assert "eval: 16 examples from 16 rows" in text
    # LoRA r8 on the 7 linear layers of 4 tiny decoder layers (hidden 64, kv 32, mlp 128).
    assert re.search(r"trainable parameters: 32,768 adapter \+ \d+ MoDE head = [\d,]+", text)
    assert "dry run: recipe valid, data ready; no training done" in text
    assert out == ""
    assert list(tmp_path.iterdir()) == []  # no outputs/ folder


def test_dry_run_with_output_dir_creates_nothing(mode, tmp_path):
    out = tmp_path / "out"
    code, _, err = mode("train", "recipe=tiny-llama-alpaca", f"output_dir={out}", "--dry-run")
    assert code == 0, err
    assert not out.exists()


# ---------------------------------------------------------------------------- installs


def test_recipes_are_found_from_any_working_directory(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = run_command(
        [str(MODE_BIN), "recipes", "show", "tiny-llama-alpaca"], cwd=tmp_path, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    shown = yaml.safe_load(result.stdout)
    assert shown["recipe"] == "tiny-llama-alpaca"
    assert shown["model"]["name_or_path"] == "tiny:llama"
    assert list(tmp_path.iterdir()) == []


def test_the_wheel_ships_the_recipes(tmp_path):
    pytest.importorskip("setuptools")
    source = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "mode_cli", source / "mode_cli", ignore=ignore)
    if (REPO / "recipes").is_dir():
        shutil.copytree(REPO / "recipes", source / "recipes", ignore=ignore)
    built = run_command(
        [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--no-index"]
        + ["-q", "-w", str(tmp_path / "dist"), str(source)],
        timeout=120,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "mode_cli/bundled/arithmetic/train.jsonl" in names
    assert any(n.endswith("recipes/tiny-llama-alpaca.yaml") for n in names)
    # Every subpackage ships (pyproject.toml lists them).
    for init in sorted((REPO / "mode_cli").glob("*/__init__.py")):
        assert f"mode_cli/{init.parent.name}/__init__.py" in names, init.parent.name
