"""lm-evaluation-harness on a run's merged folder, offline, with mode's bundled arithmetic tasks:
the plain `hf` model (final layer) and, through `mode_cli.load`, the MoDE ensemble head."""

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


def test_merged_folder_runs_as_a_plain_hf_model(tiny_run, task_manager):
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={tiny_run / 'merged'}",
        tasks=TASKS,
        task_manager=task_manager,
        limit=2,
        device="cpu",
        batch_size=4,
        gen_kwargs={"max_gen_toks": 6},
        bootstrap_iters=0,
        log_samples=False,
    )["results"]
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
