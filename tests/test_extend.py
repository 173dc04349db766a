"""Building on a finished run: extending it to more steps (`train.extend`), and starting a new run
from its adapter or from any peft adapter (`init_from`).

The runs are the real `mode train` CLI, in-process, on the tiny Llama; the references are a run
planned for the longer budget from the start, the parent's own report, and an adapter loaded with
peft itself.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from helpers import records
from safetensors.torch import load_file

from mode_cli.train import recipe as recipe_mod
from mode_cli.train.optim import lr_lambda

# adapter.dropout > 0: every step draws from torch's RNG, which an extension must carry over too.
TINY = [
    "recipe=tiny-llama-alpaca",
    "adapter.dropout=0.1",
    "eval.compare_base=false",
    "eval.answers=off",
    "eval.max_examples=4",
]
LR = 1e-3  # train=cpu-tiny's
WARMUP = 2


def train(mode, out: Path, *overrides: str) -> str:
    code, _, err = mode("train", *TINY, f"output_dir={out}", *overrides)
    text = " ".join(err.split())  # rich wraps long lines at 80 columns off a terminal
    assert code == 0, text
    return text


def refused(mode, out: Path, *overrides: str) -> str:
    code, _, err = mode("train", *TINY, f"output_dir={out}", *overrides)
    text = " ".join(err.split())
    assert code == 2, text
    return text


def by_step(run: Path, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in records(run) if key in r}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def latest_report(run: Path) -> dict:
    from mode_cli.eval.report import latest_report

    return json.loads(latest_report(run).read_text())


@pytest.fixture
def batches(monkeypatch):
    """The examples (their token ids, padding dropped) each training step reads, by run folder."""
    seen: dict[str, list[list[tuple[int, ...]]]] = {}
    real = recipe_mod.accumulate_gradients

    def recording(wrapped, micro, *args, **kwargs):
        rows = []
        for batch in micro:
            for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True):
                rows.append(tuple(ids[mask.bool()].tolist()))
        seen.setdefault("current", []).append(rows)
        return real(wrapped, micro, *args, **kwargs)

    monkeypatch.setattr(recipe_mod, "accumulate_gradients", recording)
    return seen


# ---------------------------------------------------------------------------- extend


def test_replan_extends_a_finished_run_as_if_planned_longer(mode, tmp_path, batches):
    """A 6-step run extended to 10 with replan trains steps 7-10 exactly as a 10-step run stopped
    after step 6 and resumed, when the two plans agree on steps 1-6 (a constant schedule after
    the warmup); the data go on where they stopped; a stopped extension continues with
    resume=auto alone; the final artifacts and the report are those of step 10."""
    constant = ["train.lr_schedule=constant", "checkpoint.every_steps=null"]
    ext, ref = tmp_path / "extended", tmp_path / "planned"

    train(mode, ext, *constant, "train.max_steps=6")
    adapter = ext / "adapter" / "adapter_model.safetensors"
    finished_adapter = sha256(adapter)
    assert (ext / "merged").is_dir()
    said = train(
        mode,
        ext,
        *constant,
        "train.max_steps=10",
        "resume=auto",
        "train.extend=replan",
        "train.stop_after_steps=2",
    )
    assert "extend: the run, finished at step 6, goes on to step 10" in said
    assert "data position (epoch 0, micro-batch 6)" in said
    hint = said.split("resume with: ")[1]
    assert "train.max_steps=10 train.extend=replan" in hint and "resume=auto" in hint
    # Stopped at 8: the adapter of the finished 6-step run stays until the extension finishes.
    assert sha256(adapter) == finished_adapter
    said = train(mode, ext, *constant, "train.max_steps=10", "resume=auto")
    assert "resume: continues at step 9 of 10" in said
    ext_batches = batches.pop("current")

    train(mode, ref, *constant, "train.max_steps=10", "train.stop_after_steps=6", "merge=false")
    train(mode, ref, *constant, "train.max_steps=10", "resume=auto", "merge=false")
    ref_batches = batches.pop("current")

    a, b = by_step(ext, "loss"), by_step(ref, "loss")
    assert sorted(a) == list(range(1, 11))
    for step in range(1, 11):
        assert a[step] == pytest.approx(b[step], abs=1e-6), step
    assert by_step(ext, "lr") == by_step(ref, "lr")
    # The same micro-batches in the same order: one epoch is 16, none read twice by step 10.
    assert ext_batches == ref_batches
    rows = [row for step in ext_batches for row in step]
    assert len(rows) == 40 and len(set(rows)) == 40

    # Rewritten for step 10: adapter, head, merged model, a new report with the lineage.
    assert sha256(adapter) != finished_adapter
    report = latest_report(ext)
    assert report["source"]["step"] == 10
    extension = {"from_step": 6, "from_max_steps": 6, "max_steps": 10, "schedule": "replan"}
    assert report["lineage"] == {"init_from": None, "extensions": [extension]}
    merged = (ext / "merged" / "mode_config.yaml").read_text()
    assert "max_steps: 10" in merged and "schedule: replan" in merged
    saved = load_file(str(ext / "checkpoints" / "step-000010" / "adapter.safetensors"))
    final = load_file(str(ext / "adapter" / "adapter_model.safetensors"))
    assert len(saved) == len(final)
    assert "from_step: 6" in (ext / "config.yaml").read_text()


def test_restart_warms_up_again_over_the_added_steps(mode, tmp_path, batches):
    out = tmp_path / "run"
    train(mode, out, "train.max_steps=6", "merge=false")
    train(mode, out, "train.max_steps=10", "resume=auto", "train.extend=restart", "merge=false")
    lrs = by_step(out, "lr")
    planned = lr_lambda(WARMUP, 6, 0.0)
    added = lr_lambda(WARMUP, 4, 0.0)
    for step in range(1, 7):
        assert lrs[step] == pytest.approx(LR * planned(step - 1), rel=1e-12), step
    for step in range(7, 11):
        assert lrs[step] == pytest.approx(LR * added(step - 7), rel=1e-12), step
    assert lrs[7] < lrs[8] < lrs[9]  # the warmup again, from LR / 3
    assert lrs[7] == pytest.approx(LR / 3)
    # The data went on: steps 7-10 read micro-batches 6-9 of the epoch, none seen before.
    rows = [row for step in batches["current"] for row in step]
    assert len(rows) == 40 and len(set(rows)) == 40


def test_the_schedule_of_each_extension_kind():
    """`run_schedule` against the plain formula: replan reads the longer plan at the same step,
    restart a fresh plan over the added steps; chained extensions each take their own part."""
    from omegaconf import OmegaConf

    from mode_cli.config import TrainConfig
    from mode_cli.train.optim import run_schedule

    def schedule(**values):
        return run_schedule(OmegaConf.merge(OmegaConf.structured(TrainConfig), values))

    plain = schedule(max_steps=6, warmup_steps=2)
    for step in range(6):
        assert plain(step) == lr_lambda(2, 6, 0.0)(step)
    replan = schedule(
        max_steps=10,
        warmup_steps=2,
        extensions=[{"from_step": 6, "from_max_steps": 6, "max_steps": 10, "schedule": "replan"}],
    )
    for step in range(6):
        assert replan(step) == lr_lambda(2, 6, 0.0)(step)
    for step in range(6, 10):
        assert replan(step) == lr_lambda(2, 10, 0.0)(step)
    chained = schedule(
        max_steps=20,
        warmup_steps=2,
        lr_schedule="linear",
        extensions=[
            {"from_step": 4, "from_max_steps": 6, "max_steps": 10, "schedule": "restart"},
            {"from_step": 10, "from_max_steps": 10, "max_steps": 20, "schedule": "replan"},
        ],
    )
    assert chained(3) == lr_lambda(2, 6, 0.0, "linear")(3)
    for step in range(4, 10):
        assert chained(step) == lr_lambda(2, 6, 0.0, "linear")(step - 4)
    for step in range(10, 20):
        assert chained(step) == lr_lambda(2, 20, 0.0, "linear")(step)
    assert math.isclose(chained(4), 1 / 3)


def test_what_a_resume_may_do_to_the_step_budget():
    """`extend.continuation`: an extension only with the switch, only upwards; the same budget
    continues a run (or its extension, with or without the same switch)."""
    from omegaconf import OmegaConf

    from mode_cli.config import RecipeConfig
    from mode_cli.train.extend import continuation

    def cfg(max_steps, extend=None, extensions=(), init_from=None):
        return OmegaConf.merge(
            OmegaConf.structured(RecipeConfig),
            {
                "model": {"name_or_path": "tiny:llama"},
                "init_from": init_from,
                "train": {"max_steps": max_steps, "extend": extend, "extensions": list(extensions)},
            },
        )

    lineage, problems = continuation(cfg(6), 6, cfg(10, "restart"))
    assert problems == [] and lineage.extended == {
        "from_step": 6,
        "from_max_steps": 6,
        "max_steps": 10,
        "schedule": "restart",
    }
    assert lineage.extensions == [lineage.extended]
    _, problems = continuation(cfg(6), 6, cfg(10))
    assert "add train.extend=replan" in problems[0] and "train.max_steps: 6 -> 10" in problems[0]
    _, problems = continuation(cfg(6), 4, cfg(5, "replan"))
    assert "an extension only adds steps" in problems[0]
    _, problems = continuation(cfg(6), 6, cfg(6, "replan"))
    assert "raise train.max_steps" in problems[0]
    extended = [{"from_step": 6, "from_max_steps": 6, "max_steps": 10, "schedule": "replan"}]
    for extend in (None, "replan"):
        lineage, problems = continuation(cfg(10, extensions=extended), 8, cfg(10, extend))
        assert problems == [] and lineage.extended is None and lineage.extensions == extended
    _, problems = continuation(cfg(10, extensions=extended), 8, cfg(10, "restart"))
    assert "runs with replan" in problems[0]
    lineage, problems = continuation(cfg(6, init_from="/a"), 3, cfg(6))
    assert problems == [] and lineage.init_from == "/a"
    _, problems = continuation(cfg(6, init_from="/a"), 3, cfg(6, init_from="/b"))
    assert "init_from: '/a' -> '/b'" in problems[0]


# ---------------------------------------------------------------------------- init_from


def test_a_final_only_adapter_starts_a_mode_run_where_it_ended(mode, tmp_path):
    """loss=mode from a final-only run's adapter: at step 0 the final layer's eval loss is the
    parent's final one (same eval rows); the head is fresh and said so; the digest recorded is
    the parent adapter's; a resume needs no init_from; the parent is untouched."""
    parent, child = tmp_path / "parent", tmp_path / "child"
    train(mode, parent, "loss=final-only", "train.max_steps=6", "merge=false")
    adapter = parent / "adapter" / "adapter_model.safetensors"
    before = sha256(adapter)

    said = train(
        mode,
        child,
        f"init_from={parent}",
        "loss=mode",
        "train.max_steps=4",
        "train.stop_after_steps=2",
        "merge=false",
    )
    assert f"start from the mode run {parent}" in said
    assert f"the adapter (trained on; sha256 {before[:12]})" in said
    assert "a fresh MoDE head (the source has no MoDE head)" in said
    start = records(child)[0]
    assert start["step"] == 0
    parent_final = latest_report(parent)["layers"][-1]["tuned"]["loss"]
    assert start["eval"]["final"] == pytest.approx(parent_final, abs=1e-6)
    record = json.loads((child / "init_from.json").read_text())
    assert record["adapter"] == {"file": str(adapter.resolve()), "sha256": before, "use": "trained"}
    assert record["head"] is None and record["kind"] == "run"

    said = train(mode, child, "loss=mode", "train.max_steps=4", "resume=auto", "merge=false")
    assert "resume: continues at step 3 of 4" in said
    assert sorted(by_step(child, "loss")) == [1, 2, 3, 4]
    assert latest_report(child)["lineage"]["init_from"] == record
    assert sha256(adapter) == before


def write_peft_adapter(folder: Path, **lora) -> Path:
    """An adapter written by peft itself on the tiny Llama (no mode code), with random nonzero
    LoRA weights so that it changes the model."""
    from omegaconf import OmegaConf
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from mode_cli.config import TinyModelConfig
    from mode_cli.models.tiny import build_tiny_model

    base = AutoModelForCausalLM.from_pretrained(
        build_tiny_model("llama", OmegaConf.structured(TinyModelConfig))
    )
    settings = {"r": 8, "lora_alpha": 16, "target_modules": "all-linear", **lora}
    model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", **settings))
    torch.manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn_like(param) * 0.05)
    model.save_pretrained(folder)
    return folder


def test_a_plain_peft_adapter_starts_a_mode_run(mode, tmp_path):
    """An adapter folder peft wrote: the new run's step-0 eval loss of the final layer is the one
    peft's own loading of that adapter gives on the same eval rows."""
    from omegaconf import OmegaConf
    from peft import PeftModel

    from mode_cli.data.splits import load_splits
    from mode_cli.eval.metrics import layer_metrics
    from mode_cli.models.loading import load_base_model, load_tokenizer, resolve_source
    from mode_cli.recipes import compose_recipe

    adapter = write_peft_adapter(tmp_path / "peft-adapter")
    child = tmp_path / "child"
    said = train(mode, child, f"init_from={adapter}", "train.max_steps=1", "merge=false")
    assert f"start from the peft adapter {adapter}" in said

    cfg = compose_recipe("tiny-llama-alpaca", ["eval.max_examples=4"])
    source = resolve_source(cfg.model)
    tokenizer = load_tokenizer(source, cfg.model)
    _, eval_set = load_splits(cfg.data, tokenizer)
    base = load_base_model(source, cfg.model, "fp32", "cpu")
    model = PeftModel.from_pretrained(base, str(adapter))
    expected = layer_metrics(model, None, eval_set, tokenizer, "cpu", 8, 4)["layers"][-1]["loss"]
    start = records(child)[0]
    assert start["step"] == 0
    assert start["eval"]["final"] == pytest.approx(expected, abs=1e-6)
    # Not the base's: the adapter was loaded.
    with model.disable_adapter():
        plain = layer_metrics(model, None, eval_set, tokenizer, "cpu", 8, 4)["layers"][-1]["loss"]
    assert abs(plain - expected) > 1e-3
    assert OmegaConf.load(child / "config.yaml").init_from == str(adapter)


def test_an_adapter_that_does_not_fit_is_refused_with_every_difference(mode, tmp_path):
    adapter = write_peft_adapter(
        tmp_path / "other", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True
    )
    config = json.loads((adapter / "adapter_config.json").read_text())
    base = config["base_model_name_or_path"]
    config["base_model_name_or_path"] = "someone/another-model"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    child = tmp_path / "child"

    said = refused(mode, child, f"init_from={adapter}", "train.max_steps=1")
    for words in (
        "base model: the adapter was trained on someone/another-model",
        "DoRA/LoRA: the source is a DoRA adapter, this recipe trains LoRA (set adapter.use_dora=true)",
        "adapter.r: 4 in the source, 8 in this recipe (set adapter.r=4)",
        "adapter.alpha: 8 in the source, 16 in this recipe",
        "adapter.target_modules: the source adapts q_proj, v_proj; all-linear adapts",
        "(set adapter.target_modules=[q_proj,v_proj])",
        "nothing was written",
    ):
        assert words in said
    assert said.count("error:") == 1
    assert not child.exists()

    # Following the message's fixes (the adapter's own base named again), it starts the run.
    config["base_model_name_or_path"] = base
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    said = train(
        mode,
        child,
        f"init_from={adapter}",
        "train.max_steps=1",
        "merge=false",
        "adapter.use_dora=true",
        "adapter.r=4",
        "adapter.alpha=8",
        "adapter.target_modules=[q_proj,v_proj]",
    )
    assert "Carried over: the adapter" in said


def test_a_sweep_over_loss_from_one_parent(mode, tmp_path):
    """`-m init_from=PARENT loss=mode,mode-only`: both start from the parent's adapter. The
    mode-only run keeps it frozen under the head it trains: its adapter/ is the parent's, and
    its final layer (untouched by the head) ends at the parent's eval loss."""
    parent, sweep = tmp_path / "parent", tmp_path / "sweep"
    train(mode, parent, "loss=final-only", "train.max_steps=4", "merge=false")
    code, _, err = mode(
        "train",
        "-m",
        *TINY,
        f"init_from={parent}",
        "loss=mode,mode-only",
        "train.max_steps=2",
        f"output_dir={sweep}",
    )
    assert code == 0, err
    runs = json.loads((sweep / "sweep.json").read_text())["runs"]
    assert [run["status"] for run in runs] == ["ok", "ok"]
    parent_final = latest_report(parent)["layers"][-1]["tuned"]["loss"]
    parent_adapter = load_file(str(parent / "adapter" / "adapter_model.safetensors"))
    for run in runs:
        out = Path(run["dir"])
        record = json.loads((out / "init_from.json").read_text())
        assert record["source"] == str(parent.resolve())
        assert records(out)[0]["eval"]["final"] == pytest.approx(parent_final, abs=1e-6)
    frozen = Path(runs[1]["dir"])
    assert json.loads((frozen / "init_from.json").read_text())["adapter"]["use"] == "frozen"
    kept = load_file(str(frozen / "adapter" / "adapter_model.safetensors"))
    assert kept.keys() == parent_adapter.keys()
    for name, tensor in parent_adapter.items():
        assert torch.equal(kept[name], tensor), name
    assert latest_report(frozen)["layers"][-1]["tuned"]["loss"] == pytest.approx(
        parent_final, abs=1e-6
    )
    assert (frozen / "merged" / "model.safetensors").is_file()  # base + the frozen adapter


def test_a_head_trained_over_a_frozen_adapter_resumes_exactly(mode, tmp_path):
    parent, full, split = tmp_path / "parent", tmp_path / "full", tmp_path / "split"
    train(mode, parent, "train.max_steps=3", "merge=false")  # loss=mode: adapter and head
    common = [f"init_from={parent}", "loss=mode-only", "train.max_steps=4", "merge=false"]
    said = train(mode, full, *common)
    assert "the MoDE head (sha256" in said  # same layers: the parent's head carries over
    train(mode, split, *common, "train.stop_after_steps=2")
    train(mode, split, "loss=mode-only", "train.max_steps=4", "resume=auto", "merge=false")
    a, b = by_step(full, "loss"), by_step(split, "loss")
    assert sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-6), step
