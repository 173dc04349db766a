"""`mode eval` end to end on the tiny run: run folders, merged folders, plain models, bad input."""

from __future__ import annotations

import json

import pytest
from helpers import old_run_copy
from omegaconf import OmegaConf

from mode_cli.config import ModelConfig
from mode_cli.eval.report import latest_report

# Few examples and short generations: the tiny random model never stops on its own.
QUICK = ("examples=4", "eval.max_new_tokens=6")


def report_folders(run):
    return sorted(p.parent for p in (run / "eval").glob("*/report.json"))


def eval_into(mode, folder, *overrides: str) -> tuple[dict, str]:
    """`mode eval OVERRIDES eval.output_dir=FOLDER`, which must succeed: the one report it wrote
    there, and what it printed."""
    code, _, err = mode("eval", *overrides, f"eval.output_dir={folder}")
    assert code == 0, err
    return json.loads(next(folder.glob("*/report.json")).read_text()), err


def test_eval_of_a_run_prints_and_writes_a_new_report_each_time(tiny_run, mode):
    before = report_folders(tiny_run)
    code, _, err = mode("eval", f"checkpoint={tiny_run}", *QUICK, "eval.answers=on")
    assert code == 0, err
    assert "Per-layer eval (4 examples" in err and "4 * (final)" in err and "ensemble" in err
    assert "answer accuracy: 4 greedy generations" in err
    first = latest_report(tiny_run).parent
    assert first not in before
    assert {p.name for p in first.iterdir()} == {"report.json", "report.md", "layers.png"}
    report = json.loads((first / "report.json").read_text())
    assert report["source"] == {"kind": "run", "checkpoint": str(tiny_run), "model": "tiny:llama"}
    assert report["sides"] == ["base", "tuned"] and report["eval_examples"] == 4
    answers = report["answers"]
    assert set(answers["heads"]) == {"ensemble", "final"} and answers["examples"] == 4
    assert sum(answers["agreement"].values()) == 4
    assert "## Answer accuracy" in (first / "report.md").read_text()
    saved = (first / "report.json").read_bytes()

    code, _, err = mode("eval", f"checkpoint={tiny_run}", *QUICK, "compare=none")
    assert code == 0, err
    second = latest_report(tiny_run).parent
    assert second != first and (first / "report.json").read_bytes() == saved
    again = json.loads((second / "report.json").read_text())
    assert again["sides"] == ["tuned"] and again["layers"][0]["base"] is None
    for old, new in zip(report["layers"], again["layers"], strict=True):
        assert new["tuned"]["loss"] == pytest.approx(old["tuned"]["loss"], rel=1e-5)


def test_a_merged_folder_is_evaluated_with_its_head(tiny_run, mode, tmp_path):
    run, _ = eval_into(mode, tmp_path, f"checkpoint={tiny_run}", *QUICK, "eval.answers=off")
    merged = tiny_run / "merged"
    code, _, err = mode("eval", f"checkpoint={merged}", *QUICK, "eval.answers=off", "compare=base")
    assert code == 0, err
    report = json.loads(latest_report(merged).read_text())
    assert report["source"]["kind"] == "merged" and report["source"]["base"] == "tiny:llama"
    # The base before tuning has an untrained head shaped like the export's: its ensemble too.
    assert report["ensemble"]["base"]["loss"] == pytest.approx(
        run["ensemble"]["base"]["loss"], rel=1e-3
    )
    assert report["selected_layers"] == [2, 3, 4] and report["sides"] == ["base", "tuned"]
    # The merged weights are what the adapter was trained against: the same predictions.
    for ours, theirs in zip(report["layers"], run["layers"], strict=True):
        assert ours["tuned"]["loss"] == pytest.approx(theirs["tuned"]["loss"], rel=1e-3)
        assert ours["base"]["loss"] == pytest.approx(theirs["base"]["loss"], rel=1e-3)
    assert report["ensemble"]["tuned"]["loss"] == pytest.approx(
        run["ensemble"]["tuned"]["loss"], rel=1e-3
    )


def test_an_ensemble_export_evaluated_in_4_bits_decodes_its_answers(tiny_run, mode, tmp_path):
    """`model.quantization=nf4` on an ensemble export: on the CPU its answers decode from the
    folder reloaded in 4 bits and dequantized, read as its base family as any load of it is."""
    report, _ = eval_into(
        mode,
        tmp_path,
        f"checkpoint={tiny_run / 'merged'}",
        *QUICK,
        "compare=none",
        "model.quantization=nf4",
    )
    answers = report["answers"]
    assert answers["decoded_from"] == "dequantized" and set(answers["heads"]) == {
        "ensemble",
        "final",
    }


def test_a_merged_folder_without_its_head_is_refused(tiny_run, mode, tmp_path):
    """A final-layer export keeps the head in files beside the weights; without them, the
    ensemble's report cannot be made."""
    copy = tmp_path / "merged"
    code, _, err = mode("export", f"checkpoint={tiny_run}", f"out={copy}", "head=final")
    assert code == 0, err
    (copy / "mode_head.json").unlink()
    before = report_folders(copy)
    code, _, err = mode("eval", f"checkpoint={copy}")
    assert code == 2 and "merged model without its MoDE head" in err
    assert report_folders(copy) == before


def test_a_plain_model_gets_a_base_only_logit_lens_report(mode, tmp_path, model_cache):
    from mode_cli.models.loading import resolve_source

    folder = resolve_source(OmegaConf.structured(ModelConfig(name_or_path="tiny:llama")))
    report, err = eval_into(
        mode, tmp_path / "reports", f"checkpoint={folder}", "examples=3", "eval.max_new_tokens=4"
    )
    assert report["source"]["kind"] == "model" and report["sides"] == ["base"]
    assert report["selected_layers"] == [] and report["ensemble"] is None
    assert report["data"]["eval"] == "bundled:arithmetic/eval.jsonl"
    assert all(row["tuned"] is None and row["base"]["loss"] > 0 for row in report["layers"])
    assert set(report["answers"]["heads"]) == {"final"}  # no MoDE head: the final layer only
    assert "4 (final)" in err

    code, _, err = mode("eval", f"checkpoint={folder}", "compare=base")
    assert code == 2 and "its own base" in err


def test_data_swaps_in_another_data_group(tiny_run, mode, tmp_path):
    report, _ = eval_into(
        mode,
        tmp_path,
        f"checkpoint={tiny_run}",
        "data=chat-sample",
        "examples=2",
        "eval.answers=off",
        "compare=none",
    )
    assert report["data"]["eval"] == "bundled:chat/eval.jsonl" and report["answers"] is None


def test_a_report_folder_that_cannot_be_made_is_named_as_the_default_it_is(mode, tmp_path):
    """The run's own eval/ is a file: the message names that folder and the setting that moves
    the report, not an eval.output_dir the user never set."""
    import shutil

    run = old_run_copy(tmp_path)
    shutil.rmtree(run / "eval")
    (run / "eval").write_text("not a folder")
    code, _, err = mode("eval", f"checkpoint={run}")
    said = " ".join(err.split())
    assert code == 2 and f"{run / 'eval'}: {run / 'eval'} is a file, not a folder" in said, err
    assert "eval.output_dir=DIR writes there instead" in said and "eval.output_dir=/" not in said
    assert (run / "eval").read_text() == "not a folder"


def test_another_data_group_keeps_the_chat_template_the_run_was_tuned_in(tmp_path):
    """`data=NAME` swaps the rows, not the prompt format the model learned: a run tuned with
    `data.chat_template=chatml` renders the new group's chats in ChatML unless told otherwise."""

    from mode_cli.artifacts import classify
    from mode_cli.eval.command import eval_config

    run = old_run_copy(tmp_path)
    recipe = OmegaConf.load(run / "config.yaml")
    recipe.data.chat_template = "chatml"
    OmegaConf.save(recipe, run / "config.yaml")
    cfg, _ = eval_config(classify(str(run)), ["data=chat-sample"])
    assert cfg.data.train == "bundled:chat/train.jsonl" and cfg.data.chat_template == "chatml"
    cfg, _ = eval_config(classify(str(run)), ["data=chat-sample", "data.chat_template=null"])
    assert cfg.data.chat_template is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("data=text-sample", "eval.answers=on"), "needs reference answers"),
        (("examples=many",), "examples='many': expected a whole number"),
        (("compare=maybe",), "compare='maybe': expected base or none"),
        (("data=nope",), "no such data group option. Options: alpaca"),
        (("eval.answer_match=fuzzy",), "eval.answer_match='fuzzy': expected one of"),
        (("eval.max_new_tokens=0",), "eval.max_new_tokens=0: expected a number > 0"),
    ],
)
def test_bad_eval_settings_are_one_clear_message(tiny_run, mode, args, message):
    before = report_folders(tiny_run)
    code, _, err = mode("eval", f"checkpoint={tiny_run}", *args)
    assert code == 2 and message in err, err
    assert report_folders(tiny_run) == before


def test_what_is_not_a_checkpoint_is_named(mode, tmp_path):
    code, _, err = mode("eval", f"checkpoint={tmp_path}")
    assert code == 2
    assert "is not a mode run folder, merged folder or model folder" in err
    (tmp_path / "config.yaml").write_text("- a list\n- not a recipe\n")
    code, _, err = mode("eval", f"checkpoint={tmp_path}")
    assert code == 2 and "is not a mode recipe" in err
