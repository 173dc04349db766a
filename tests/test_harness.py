"""lm-evaluation-harness on a run's exports, offline, with mode's bundled arithmetic tasks: the
ensemble export as `--model hf` with trust_remote_code (the ensemble's log-likelihoods), the
final-layer export as a plain `hf` model, and the model from `mode_cli.load` handed to HFLM."""

from __future__ import annotations

import json

import pytest
import torch

from mode_cli import harness_dir
from mode_cli.decode import ensemble as ensemble_mod

lm_eval = pytest.importorskip("lm_eval")

TASKS = ["mode_arithmetic_mc", "mode_arithmetic_gen"]


@pytest.fixture(scope="module")
def task_manager():
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(harness_dir()), include_defaults=False)
    assert set(TASKS) <= set(manager.all_tasks)
    return manager


def test_tasks_are_built_from_the_bundled_eval_set():
    import importlib.util

    spec = importlib.util.spec_from_file_location("harness_utils", harness_dir() / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    test = utils.load_arithmetic(version=1.0)["test"]
    rows = [json.loads(line) for line in utils.EVAL_FILE.read_text().splitlines()]
    assert len(test) == len(rows) == 200
    for i, (doc, row) in enumerate(zip(test, rows, strict=True)):
        assert doc["answer"] == row["answer"]
        assert row["instruction"] in doc["prompt"] and doc["prompt"].endswith("### Response:\n")
        assert len(set(doc["choices"])) == 4 and doc["gold"] == i % 4
        assert doc["choices"][doc["gold"]] == f"The answer is {row['answer']}."
        assert row["output"].endswith(doc["choices"][doc["gold"]])
    from mode_cli.data.formats import alpaca_prompt

    assert all(doc["prompt"] == alpaca_prompt(row) for doc, row in zip(test, rows, strict=True))


@pytest.fixture(scope="module")
def final_export(tiny_run, tmp_path_factory):
    from mode_cli.export.command import export

    return export(tiny_run, tmp_path_factory.mktemp("exports") / "final", head="final")


def test_the_final_export_runs_as_a_plain_hf_model(final_export):
    from mode_cli.eval.harness import command, evaluate, model_args

    assert model_args(final_export) == f"pretrained={final_export}"
    assert command(final_export)[:5] == [
        "lm_eval",
        "--model",
        "hf",
        "--model_args",
        model_args(final_export),
    ]
    results = evaluate(final_export, limit=2, batch_size=4, gen_kwargs={"max_gen_toks": 6})
    results = results["results"]
    assert 0.0 <= results["mode_arithmetic_mc"]["acc,none"] <= 1.0
    assert 0.0 <= results["mode_arithmetic_gen"]["exact_match,answer"] <= 1.0


def continuation_logprob(model, tokenizer, context: str, continuation: str) -> float:
    """Sum of log-probabilities of the continuation's tokens after the context, split as the
    harness splits them (trailing whitespace of the context moves to the continuation)."""
    stripped = context.rstrip()
    context, continuation = stripped, context[len(stripped) :] + continuation
    context_ids = tokenizer(context)["input_ids"]
    whole = tokenizer(context + continuation)["input_ids"]
    ids = torch.tensor([whole])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    return float(sum(logprobs[pos - 1, whole[pos]] for pos in range(len(context_ids), len(whole))))


def choice_logprobs(results: dict) -> tuple[list[dict], list[list[float]]]:
    """The MC task's documents and each choice's log-likelihood, as the harness scored them."""
    samples = results["samples"]["mode_arithmetic_mc"]
    return [s["doc"] for s in samples], [[resp[0][0] for resp in s["resps"]] for s in samples]


def test_the_ensemble_export_scores_with_the_ensemble(tiny_run, final_export):
    """`--model hf` with trust_remote_code on the merged folder (the ensemble export): every
    choice's log-likelihood equals mode's ensemble's on the run, and differs from the final
    layer's."""
    from mode_cli import load
    from mode_cli.eval.harness import evaluate, model_args

    merged = tiny_run / "merged"
    assert model_args(merged).endswith(",trust_remote_code=True")
    docs, ensemble = choice_logprobs(
        evaluate(merged, ["mode_arithmetic_mc"], limit=3, batch_size=4, log_samples=True)
    )
    _, final = choice_logprobs(
        evaluate(final_export, ["mode_arithmetic_mc"], limit=3, batch_size=4, log_samples=True)
    )
    model, tokenizer = load(tiny_run, device="cpu")  # the 4-bit base and the adapter, as trained
    for doc, scores, final_scores in zip(docs, ensemble, final, strict=True):
        expected = [
            continuation_logprob(model, tokenizer, doc["prompt"], c) for c in doc["choices"]
        ]
        assert scores == pytest.approx(expected, abs=1e-4)
        assert max(abs(a - b) for a, b in zip(scores, final_scores, strict=True)) > 1e-3


def test_ensemble_head_through_the_python_api(tiny_run, task_manager):
    """HFLM on the model from `mode_cli.load` scores with the ensemble: its log-likelihoods are
    the ensemble's (not the final layer's)."""
    from lm_eval.models.huggingface import HFLM

    from mode_cli import load

    model, tokenizer = load(tiny_run / "merged", device="cpu")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4)

    def scores():
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=["mode_arithmetic_mc"],
            task_manager=task_manager,
            limit=1,
            bootstrap_iters=0,
            log_samples=True,
        )
        sample = out["samples"]["mode_arithmetic_mc"][0]
        assert 0.0 <= out["results"]["mode_arithmetic_mc"]["acc,none"] <= 1.0
        return sample, [resp[0][0] for resp in sample["resps"]]

    sample, ensemble = scores()
    with ensemble_mod.use_head(model, "final"):
        _, final = scores()
    doc = sample["doc"]
    expected = [continuation_logprob(model, tokenizer, doc["prompt"], c) for c in doc["choices"]]
    assert ensemble == pytest.approx(expected, abs=1e-4)
    assert max(abs(a - b) for a, b in zip(ensemble, final, strict=True)) > 1e-3
