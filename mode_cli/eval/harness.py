"""Scoring an exported model with EleutherAI's lm-evaluation-harness (the optional `harness` extra):
as `lm_eval --model hf` loads it, `trust_remote_code=True` for a MoDE ensemble export.

    from mode_cli.eval.harness import evaluate
    results = evaluate("outputs/smollm2-arithmetic/<time>/merged", limit=50)
    results["results"]["mode_arithmetic_gen"]["exact_match,answer"]

`mode` ships two offline tasks built from its bundled arithmetic eval set (`mode_cli/harness/`):
`mode_arithmetic_mc` (multiple choice by log-likelihood) and `mode_arithmetic_gen` (greedy answers,
exact match).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mode_cli.errors import ModeError
from mode_cli.files import read_json

HARNESS_DIR = Path(__file__).resolve().parent.parent / "harness"
# The bundled tasks and the score each reports, as keys of lm_eval's results[task].
TASK_SCORES = {"mode_arithmetic_mc": "acc,none", "mode_arithmetic_gen": "exact_match,answer"}
BUNDLED_TASKS = tuple(TASK_SCORES)


def model_args(model_dir: str | Path) -> str:
    """`--model_args` of `lm_eval --model hf` for an export: its path, and `trust_remote_code=True`
    when it holds the MoDE ensemble's code."""
    folder = Path(model_dir)
    config = read_json(folder / "config.json")
    trust = isinstance(config, dict) and "auto_map" in config
    return f"pretrained={folder}" + (",trust_remote_code=True" if trust else "")


def command(
    model_dir: str | Path,
    tasks: Sequence[str] = BUNDLED_TASKS,
    *,
    device: str = "cpu",
    batch_size: int = 8,
) -> list[str]:
    """The `lm_eval` command line that scores an export on `tasks` (the bundled ones found through
    `--include_path`)."""
    return [
        "lm_eval",
        "--model",
        "hf",
        "--model_args",
        model_args(model_dir),
        "--include_path",
        str(HARNESS_DIR),
        "--tasks",
        ",".join(tasks),
        "--device",
        device,
        "--batch_size",
        str(batch_size),
    ]


def evaluate(
    model_dir: str | Path,
    tasks: Sequence[str] = BUNDLED_TASKS,
    *,
    limit: int | None = None,
    device: str = "cpu",
    batch_size: int = 8,
    log_samples: bool = False,
    gen_kwargs: dict | None = None,
) -> dict:
    """What `lm_eval.simple_evaluate` returns for an export on `tasks`: `results` by task, and
    with `log_samples` every document's scored requests (`samples`)."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ModeError(
            'lm-evaluation-harness is not installed: pip install "mode-cli[harness]"'
        ) from None
    own = all(task in BUNDLED_TASKS for task in tasks)
    manager = TaskManager(include_path=str(HARNESS_DIR), include_defaults=not own)
    return lm_eval.simple_evaluate(
        model="hf",
        model_args=model_args(model_dir),
        tasks=list(tasks),
        task_manager=manager,
        limit=limit,
        device=device,
        batch_size=batch_size,
        gen_kwargs=gen_kwargs,
        bootstrap_iters=0,
        log_samples=log_samples,
    )
