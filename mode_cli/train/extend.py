"""Extending a run: more steps for a finished or stopped run, in its own folder.

    mode train recipe=R output_dir=RUN resume=auto train.max_steps=750 train.extend=replan

An extension is a resume with a larger `train.max_steps`: the adapter, MoDE head, optimizer state,
data position (the next micro-batch of the epoch it was in), step count and random state carry
over, and metrics.jsonl goes on. What changes is the learning rate of the added steps,
`train.extend` (`optim.run_schedule`):

- `replan`: the schedule as if `max_steps` had been the new value from the start, continued from
  the current step. With `train.lr_schedule=constant` a run extended from 6 to 10 steps trains
  exactly as one planned for 10 (tests/test_extend.py); with a decay the first steps had the
  shorter plan's learning rates, so the weights differ, and the added steps' rates are those of
  the longer plan.
- `restart`: a new warmup of `train.warmup_steps`, then the decay over the added steps alone.

Everything else of the recipe must stay as it was (a resume's rule); a larger `max_steps` without
`train.extend` is refused with the switch named, a smaller one always. The run's config.yaml, its
checkpoints' and its reports record every extension (`train.extensions`: from which step, from
which budget to which, with which schedule); a resume takes them, and `init_from`, from the
checkpoint, so a stopped extension continues with the same command, `train.extend` optional.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import DictConfig, OmegaConf

from mode_cli.config import ExtensionConfig

SCHEDULE_WORDS = {
    "replan": "the schedule as if planned for {max_steps} steps from the start",
    "restart": "a new warmup of {warmup} steps, then the decay over the added steps",
}


@dataclass(frozen=True)
class Lineage:
    """What a resumed run takes from its checkpoint besides the weights and counters.

    Attributes:
        init_from: the weights the run started from (`init_from`), or None.
        extensions: the run's extensions so far, the one this invocation starts included, as
            `ExtensionConfig` dicts.
        extended: the extension this invocation starts, or None (a plain resume).
    """

    init_from: str | None = None
    extensions: list[dict] = field(default_factory=list)
    extended: dict | None = None


def continuation(saved: DictConfig, step: int, cfg: DictConfig) -> tuple[Lineage, list[str]]:
    """How a run resumed at `step` from a checkpoint trained with `saved` continues under `cfg`:
    its lineage, and the problems that refuse it (a budget changed without `train.extend`, a
    smaller budget, an extension with nothing to add, another `init_from`), in the words of the
    list of settings that differ."""
    problems = []
    init_from = saved.init_from
    if cfg.init_from is not None and cfg.init_from != init_from:
        problems.append(
            f"init_from: {init_from!r} -> {cfg.init_from!r} (a resume continues from its "
            "checkpoint's weights: leave init_from out, or start a new run in another output_dir)"
        )
    extensions = [dict(item) for item in OmegaConf.to_container(saved.train.extensions)]
    before, now, extend = saved.train.max_steps, cfg.train.max_steps, cfg.train.extend
    extended = None
    if now > before and extend is None:
        problems.append(
            f"train.max_steps: {before} -> {now}: to train the run on to {now} steps, add "
            "train.extend=replan (the schedule as if planned for "
            f"{now} steps) or train.extend=restart (a new warmup and decay over the added steps)"
        )
    elif now > before:
        extended = {"from_step": step, "from_max_steps": before, "max_steps": now}
        extended["schedule"] = extend
        extensions.append(extended)
    elif now < before:
        problems.append(
            f"train.max_steps: {before} -> {now}: an extension only adds steps (the run is at "
            f"step {step}); to stop a run earlier, use train.stop_after_steps"
        )
    elif extend is not None:
        last = extensions[-1] if extensions else None
        if last is None or last["max_steps"] != now:
            problems.append(
                f"train.extend={extend}: the run's budget is {now} steps already; raise "
                "train.max_steps to extend it"
            )
        elif last["schedule"] != extend:
            problems.append(
                f"train.extend={extend}: the run's extension to {now} steps runs with "
                f"{last['schedule']}; continue it with train.extend={last['schedule']} or "
                "without train.extend"
            )
    return Lineage(init_from, extensions, extended), problems


def apply(cfg: DictConfig, lineage: Lineage) -> None:
    """Give the run the lineage its checkpoint recorded (and the extension it starts)."""
    cfg.init_from = lineage.init_from
    cfg.train.extensions = [ExtensionConfig(**item) for item in lineage.extensions]


def describe(extension: dict, cfg: DictConfig, *, position: str, next_lr: float) -> str:
    """The start-of-run words of an extension: what carries over, what is new."""
    start, before, now = extension["from_step"], extension["from_max_steps"], extension["max_steps"]
    how = f"finished at step {start}" if start == before else f"stopped at step {start} of {before}"
    schedule = SCHEDULE_WORDS[extension["schedule"]].format(
        max_steps=now, warmup=cfg.train.warmup_steps
    )
    return (
        f"extend: the run, {how}, goes on to step {now}. Carried over: the adapter, "
        f"MoDE head, optimizer state, step count, data position ({position}) and metrics.jsonl. "
        f"New: steps {start + 1}-{now}, learning rate train.extend={extension['schedule']} "
        f"({schedule}), {next_lr:.3g} at step {start + 1}. The final adapter, head, merged model "
        f"and report are written again at step {now}"
    )
