"""The eval report's parts without the CLI: metrics against a naive reference, answer scoring,
the files (JSON, Markdown, PNG) and their folders."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from helpers import OLD_RUN
from omegaconf import OmegaConf
from transformers import LlamaConfig, LlamaForCausalLM

from mode_cli.config import RecipeConfig
from mode_cli.data.splits import Dataset, DataStats
from mode_cli.data.tokenizing import IGNORE, Example
from mode_cli.eval import answers as answers_mod
from mode_cli.eval import metrics as metrics_mod
from mode_cli.eval import render as render_mod
from mode_cli.eval import report as report_mod
from mode_cli.eval.plots import layers_figure
from mode_cli.mode.head import MoDEHead

# ---------------------------------------------------------------------------- metrics


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    head = MoDEHead(model.model.norm, [2, 3, 4], 4, 32, router="token")
    with torch.no_grad():  # a router that is not at its initial, token-independent state
        head.router.weight.normal_(0, 0.5)
        for norm in head.norms.values():
            norm.weight.mul_(1.3)
    generator = random.Random(0)
    examples = []
    for length in (9, 14, 6, 11, 12):
        ids = [generator.randrange(1, 97) for _ in range(length)]
        prompt = length // 3
        examples.append(Example(ids, [IGNORE] * prompt + ids[prompt:]))
    return model, head, Dataset(examples, DataStats())


class PadTokenizer:
    pad_token_id = 0


def naive_metrics(model, head, dataset):
    """Per-layer and ensemble loss/top-1, one unpadded example at a time, from the full states."""
    per_layer = {layer: [] for layer in range(1, 5)}
    ensemble, weights = [], []
    lm_head = model.lm_head
    for example in dataset.examples:
        ids = torch.tensor([example.input_ids])
        out = model(ids, output_hidden_states=True)
        states = out.hidden_states
        labels = torch.tensor(example.labels[1:])
        keep = labels != IGNORE
        for layer in range(1, 5):
            if layer == 4:
                logits = out.logits[0, :-1]
            else:
                norm = model.model.norm if layer == 1 else head.norms[str(layer)]
                logits = lm_head(norm(states[layer][0, :-1]))
            per_layer[layer].append((logits[keep], labels[keep]))
        normed = [head.norms[str(layer)](states[layer][0, :-1]) for layer in (2, 3)]
        normed.append(states[4][0, :-1])
        routing = torch.softmax(head.router(normed[-1]), -1)
        mixed = sum(routing[:, i : i + 1] * normed[i] for i in range(3))
        ensemble.append((lm_head(mixed)[keep], labels[keep]))
        weights.append(routing[keep])

    def summary(pairs):
        logits = torch.cat([p[0] for p in pairs])
        labels = torch.cat([p[1] for p in pairs])
        loss = torch.nn.functional.cross_entropy(logits, labels).item()
        return loss, (logits.argmax(-1) == labels).float().mean().item()

    weights = torch.cat(weights).double()
    return (
        {layer: summary(pairs) for layer, pairs in per_layer.items()},
        summary(ensemble),
        weights.mean(0),
        weights.std(0, unbiased=False),
    )


@torch.no_grad()
def test_layer_metrics_match_a_naive_per_example_reference(tiny_llama):
    model, head, dataset = tiny_llama
    got = metrics_mod.layer_metrics(model, head, dataset, PadTokenizer(), "cpu", 2, None)
    layers, ensemble, mean, std = naive_metrics(model, head, dataset)
    assert got["examples"] == 5
    assert got["tokens"] == sum(
        e.trained_tokens - (e.labels[0] != IGNORE) for e in dataset.examples
    )
    for layer in range(1, 5):
        metrics = got["layers"][layer - 1]
        assert metrics["loss"] == pytest.approx(layers[layer][0], rel=1e-5)
        assert metrics["top1"] == pytest.approx(layers[layer][1], abs=1e-9)
        assert metrics["perplexity"] == pytest.approx(math.exp(layers[layer][0]), rel=1e-5)
    assert got["ensemble"]["loss"] == pytest.approx(ensemble[0], rel=1e-5)
    assert got["ensemble"]["top1"] == pytest.approx(ensemble[1], abs=1e-9)
    for i, layer in enumerate((2, 3, 4)):
        assert got["router"][layer]["mean"] == pytest.approx(mean[i].item(), abs=1e-6)
        assert got["router"][layer]["std"] == pytest.approx(std[i].item(), abs=1e-5)
    assert std.max() > 1e-3  # the router really varies across tokens


def test_layer_metrics_of_some_layers_equal_those_of_the_full_pass(tiny_llama):
    model, head, dataset = tiny_llama
    full = metrics_mod.layer_metrics(model, head, dataset, PadTokenizer(), "cpu", 2, None)
    some = metrics_mod.layer_metrics(
        model, head, dataset, PadTokenizer(), "cpu", 2, None, only_layers=[3]
    )
    assert some["layers"][0] is None and some["layers"][1] is None  # layers 1, 2 not read
    for layer in (3, 4):  # the asked-for layer and the final one
        assert some["layers"][layer - 1] == full["layers"][layer - 1]
    assert some["ensemble"] == full["ensemble"] and some["router"] == full["router"]


@torch.no_grad()
def test_layer_metrics_without_a_head_read_every_layer_through_the_final_norm(tiny_llama):
    model, _, dataset = tiny_llama
    got = metrics_mod.layer_metrics(model, None, dataset, PadTokenizer(), "cpu", 8, 3)
    assert got["ensemble"] is None and got["router"] == {} and got["examples"] == 3
    ids = torch.tensor([dataset.examples[0].input_ids])
    states = model(ids, output_hidden_states=True).hidden_states
    single = Dataset(dataset.examples[:1], DataStats())
    one = metrics_mod.layer_metrics(model, None, single, PadTokenizer(), "cpu", 1, None)
    labels = torch.tensor(dataset.examples[0].labels[1:])
    keep = labels != IGNORE
    logits = model.lm_head(model.model.norm(states[2][0, :-1]))[keep]
    loss = torch.nn.functional.cross_entropy(logits, labels[keep]).item()
    assert one["layers"][1]["loss"] == pytest.approx(loss, rel=1e-5)


# ---------------------------------------------------------------------------- answers


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so 31 - 27 = 4. The answer is 4.", "4"),
        ("The answer is 1,234. Then 7 more lines 99", "1234"),
        ("Natalia sold 48/2 = 24 clips.\n#### 72", "72"),
        ("#### 3.50", "3.5"),
        ("it is 12 then 42.0", "42"),
        ("the answer is -7", "-7"),
        ("no digits here", None),
    ],
)
def test_number_answers(text, expected):
    assert answers_mod.number_answer(text) == expected


def test_normalisations_compare_as_documented():
    assert answers_mod.is_correct("The answer is 72.", "Half is 36. #### 72", "number")
    assert not answers_mod.is_correct("The answer is 71.", "#### 72", "number")
    assert not answers_mod.is_correct("nothing", "72", "number")
    assert answers_mod.is_correct("  Paris.\n", "paris", "exact")
    assert not answers_mod.is_correct("Paris, France", "paris", "exact")
    assert not answers_mod.is_correct("", "", "exact")
    assert answers_mod.is_correct("I think the answer is (C) because", "C", "choice")
    assert answers_mod.is_correct("B) seems right", "B", "choice")
    assert not answers_mod.is_correct("A lot of reasons, so the answer is D", "A", "choice")


def test_scoring_counts_agreement_like_a_plain_loop():
    generator = random.Random(3)
    references = [str(generator.randrange(10)) for _ in range(40)]
    ensemble = [f"The answer is {generator.randrange(10)}." for _ in range(40)]
    final = [f"The answer is {generator.randrange(10)}." for _ in range(40)]
    prompts = [f"prompt {i}" for i in range(40)]
    result = answers_mod.score(
        references, prompts, {"ensemble": ensemble, "final": final}, "number"
    )
    right_e = [e == f"The answer is {r}." for e, r in zip(ensemble, references, strict=True)]
    right_f = [f == f"The answer is {r}." for f, r in zip(final, references, strict=True)]
    pairs = list(zip(right_e, right_f, strict=True))
    assert result["heads"]["ensemble"]["correct"] == sum(right_e)
    assert result["heads"]["final"]["accuracy"] == pytest.approx(sum(right_f) / 40)
    assert result["agreement"] == {
        "both_right": pairs.count((True, True)),
        "ensemble_only": pairs.count((True, False)),
        "final_only": pairs.count((False, True)),
        "both_wrong": pairs.count((False, False)),
    }
    assert sum(result["agreement"].values()) == 40
    for kind, wanted in (("ensemble_only", (True, False)), ("final_only", (False, True))):
        examples = result["disagreements"][kind]
        assert len(examples) == min(3, pairs.count(wanted))
        for example in examples:
            assert pairs[example["index"]] == wanted
            assert example["prompt"] == prompts[example["index"]]
            assert example["ensemble"] == ensemble[example["index"]]


def test_answers_on_needs_a_reference_on_every_row():
    rows = [{"answer": "4"}, {"answer": " "}, {"answer": "2"}]
    assert not answers_mod.has_answers(rows, "answer")
    with pytest.raises(answers_mod.ModeError, match="row 2 has none.*eval.answer_field"):
        answers_mod.check_answers_available(rows, "answer", "data.jsonl")
    assert answers_mod.has_answers([{"label": "A"}], "label")


# ---------------------------------------------------------------------------- files


def metrics(loss: float, top1: float) -> dict:
    return {"loss": loss, "perplexity": math.exp(loss), "top1": top1}


def side(scale: float, with_router: bool = True) -> dict:
    layers = [metrics(scale * (6 - layer), 0.1 * layer) for layer in range(1, 6)]
    return {
        "layers": layers,
        "ensemble": metrics(scale * 0.9, 0.55) if with_router else None,
        "router": {4: {"mean": 0.3, "std": 0.1}, 5: {"mean": 0.7, "std": 0.1}}
        if with_router
        else {},
        "examples": 7,
        "tokens": 123,
    }


def recipe_cfg():
    cfg = OmegaConf.merge(
        OmegaConf.structured(RecipeConfig),
        {
            "recipe": "unit",
            "model": {"name_or_path": "tiny:llama"},
            "data": {"train": "bundled:arithmetic/train.jsonl"},
        },
    )
    return cfg


def sample_report(answers: dict | None = None) -> dict:
    return report_mod.assemble(
        recipe_cfg(),
        tuned=side(0.5),
        base=side(1.0),
        selected=[4, 5],
        source={"kind": "run", "checkpoint": "/runs/unit"},
        answers=answers,
    )


def test_the_report_keeps_the_documented_keys():
    report = sample_report()
    assert report["schema"] == {"name": "mode-report", "version": 4}
    assert report["sides"] == ["base", "tuned"]
    assert [row["layer"] for row in report["layers"]] == [1, 2, 3, 4, 5]
    assert [row["selected"] for row in report["layers"]] == [False, False, False, True, True]
    assert report["layers"][3]["router_weight"] == {"mean": 0.3, "std": 0.1}
    assert report["layers"][0]["router_weight"] is None
    assert report["layers"][2]["tuned"]["loss"] == pytest.approx(1.5)
    assert report["ensemble"]["base"]["loss"] == pytest.approx(0.9)
    assert report["data"]["eval"].startswith("bundled:arithmetic/train.jsonl (a held-out 5%")
    assert (report["eval_examples"], report["eval_tokens"]) == (7, 123)


def test_the_figure_plots_the_reports_numbers():
    report = sample_report()
    figure = layers_figure(report)
    loss_ax, top1_ax = figure.axes
    for ax, key in ((loss_ax, "loss"), (top1_ax, "top1")):
        lines = {line.get_label(): line for line in ax.lines}
        assert set(lines) == {"base", "tuned", "base ensemble", "tuned ensemble"}
        for name in ("base", "tuned"):
            assert list(lines[name].get_xdata()) == [1, 2, 3, 4, 5]
            assert list(lines[name].get_ydata()) == [row[name][key] for row in report["layers"]]
            assert set(lines[f"{name} ensemble"].get_ydata()) == {report["ensemble"][name][key]}
    assert loss_ax.get_yscale() == "log"  # losses from 0.5 to 5: a log scale


def test_a_base_only_report_has_one_curve_and_no_tuned_columns():
    report = report_mod.assemble(
        recipe_cfg(),
        tuned=None,
        base=side(1.0, with_router=False),
        selected=[],
        source={"kind": "model", "checkpoint": "some/model", "model": "some/model"},
    )
    assert report["sides"] == ["base"] and report["ensemble"] is None
    assert report["recipe"] is None and report["model"] == "some/model"
    assert all(row["tuned"] is None for row in report["layers"])
    assert render_mod.header(report) == ["layer", "loss", "ppl", "top-1"]
    assert [line.get_label() for line in layers_figure(report).axes[0].lines] == ["base"]
    markdown = render_mod.to_markdown(report)
    assert "| 5 (final) | 1.0000 | 2.72 | 0.500 |" in markdown
    assert "(model (no run))" in markdown


def test_report_files_go_into_new_folders_and_never_overwrite(tmp_path, monkeypatch):
    class FrozenClock(report_mod.datetime):
        @classmethod
        def now(cls, tz=None):
            return report_mod.datetime(2026, 1, 2, 3, 4, 5, tzinfo=tz)

    monkeypatch.setattr(report_mod, "datetime", FrozenClock)
    answers = answers_mod.score(
        ["4", "5"],
        ["What is 2+2?", "What is 2+3?"],
        {"ensemble": ["The answer is 4.", "6"], "final": ["3", "The answer is 5."]},
        "number",
    )
    answers.update({"field": "answer", "match": "number", "max_new_tokens": 8})
    first = report_mod.save_report(sample_report(), tmp_path / "eval")
    second = report_mod.save_report(sample_report(answers), tmp_path / "eval")
    assert first.name == "20260102-030405" and second.name == "20260102-030405-2"
    for folder in (first, second):
        assert {p.name for p in folder.iterdir()} == {"report.json", "report.md", "layers.png"}
        assert (folder / "layers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((first / "report.json").read_text())["answers"] is None
    assert report_mod.latest_report(tmp_path) == second / "report.json"
    for _ in range(3, 11):  # "-10" is newer than "-2", though it sorts before it as text
        (report_mod.new_report_folder(tmp_path / "eval") / "report.json").write_text("{}")
    assert report_mod.latest_report(tmp_path).parent.name == "20260102-030405-10"
    assert report_mod.latest_report(tmp_path / "nothing") is None

    markdown = (second / "report.md").read_text()
    assert "| tuned | final | 1 / 2 | 0.500 | 0.095-0.905 |" in markdown
    assert "| tuned | ensemble | 1 / 2 | 0.500 | 0.095-0.905 |" in markdown
    assert "| ensemble right, final wrong | 1 |" in markdown
    assert "### Final right, ensemble wrong" in markdown and "What is 2+3?" in markdown
    assert "| 4 * | 2.0000 | 1.0000 |" in markdown and "| ensemble | 0.9000 | 0.4500 |" in markdown
    import matplotlib.image

    assert matplotlib.image.imread(second / "layers.png").shape[2] in (3, 4)


def test_gsm8k_style_rows_are_scored_on_their_final_number(tmp_path):
    rows = [
        {"question": "Tom has 3 bags of 4 apples. How many?", "answer": "3 * 4 = 12\n#### 12"},
        {"question": "Half of 1,000?", "answer": "1,000 / 2 = 500\n#### 500"},
    ]
    path = tmp_path / "gsm8k.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    mapping = {"instruction": "question", "output": "answer"}
    data = {"train": str(path), "eval": str(path), "fields": mapping}
    cfg = OmegaConf.merge(recipe_cfg(), {"data": data, "eval": {"answers": "on"}})
    selected = answers_mod.answer_rows(cfg)
    assert [row["instruction"] for row in selected] == [row["question"] for row in rows]
    assert answers_mod.is_correct("12 apples. The answer is 12.", selected[0]["answer"], "number")
    assert answers_mod.is_correct("So 500", selected[1]["answer"], "number")
    assert not answers_mod.is_correct("The answer is 2.", selected[1]["answer"], "number")
    assert answers_mod.answer_rows(cfg, auto=True) is not None
    cfg.eval.answers = "auto"
    assert answers_mod.answer_rows(cfg, auto=False) is None  # the end-of-training default
    cfg.eval.answer_field = "solution"
    assert answers_mod.answer_rows(cfg) is None
    cfg.eval.answers = "on"
    with pytest.raises(answers_mod.ModeError, match="no 'solution' field"):
        answers_mod.answer_rows(cfg)


def test_the_card_reads_the_report_training_wrote(tmp_path):
    """Not a later `mode eval` of other data in the run's eval/, and where the run wrote its
    reports to a shared eval.output_dir, its own among other runs'."""
    from mode_cli.eval.report import training_report

    def write(folder, source):
        folder.mkdir(parents=True)
        (folder / "report.json").write_text(json.dumps({"source": source, "name": folder.name}))

    run = tmp_path / "run"
    write(run / "eval" / "20261206-010000", {"kind": "run", "checkpoint": str(run), "step": 8})
    write(run / "eval" / "20261206-020000", {"kind": "run", "checkpoint": str(run)})  # mode eval
    assert training_report(run)["name"] == "20261206-010000"
    shared = tmp_path / "reports"
    other = tmp_path / "other"
    write(shared / "20261206-010000", {"kind": "run", "checkpoint": str(run), "step": 8})
    write(shared / "20261206-030000", {"kind": "run", "checkpoint": str(other), "step": 8})
    assert training_report(run, str(shared))["name"] == "20261206-010000"
    assert training_report(other, str(shared))["name"] == "20261206-030000"
    assert training_report(tmp_path / "third", str(shared)) is None
    # A run of the 0.1.0 release did not mark its reports: the newest in its eval/.
    old = OLD_RUN
    assert training_report(old)["source"]["checkpoint"] == "tests/fixtures/run-0.1.0"
