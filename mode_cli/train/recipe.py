"""`mode train`: QLoRA + MoDE finetuning in plain PyTorch, readable top to bottom.

setup (seed, tokenizer, data, 4-bit base, LoRA, MoDE head, optimizer, schedule) -> train (the
loop) -> save (adapter, head, metrics) -> report (per-layer eval) -> merge (plain transformers
model). The step's work is in `steps.py`, the optimizer and schedule in `optim.py`, checkpoints in
`checkpoint.py`; every knob is in `config.py`. The trade-offs that matter most:

- train.micro_batch_size x train.grad_accum_steps is the optimizer batch. Memory follows the
  micro-batch; the loss is normalised by the target tokens of the whole optimizer step.
- train.gradient_checkpointing recomputes decoder activations in backward: less memory, ~30% slower.
- train.precision=bf16 runs the forward under bf16 autocast with 4-bit layers computing in bf16:
  half the activation memory and the GPU's fast matmuls; the loss still computes in fp32. It runs
  on the CPU too (torch's CPU autocast); fp32 is exact.
- train.head_lr gives the MoDE head its own learning rate (norms and router move slowly at the
  adapter's rate).
- checkpoint.every_steps trades disk writes for lost work: a checkpoint holds everything needed to
  continue bit for bit (weights, optimizer, schedule, RNG states, data position); `resume=auto`
  continues from the newest intact one. Ctrl-C / SIGTERM finish the step and checkpoint first.

A run starts in one of four ways, each said in words at its start (what carries over, what is
new): a new run; a resume (`resume=`, exactly the losses of an uninterrupted run); an extension
(`resume=` with a larger train.max_steps and `train.extend`, `extend.py`); a new run from trained
weights (`init_from=`, `start_from.py`).
"""

from __future__ import annotations

import json
import math
import shlex
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import TypeVar

import torch
from omegaconf import DictConfig, OmegaConf

from mode_cli.artifacts import (
    ADAPTER_DIR,
    INIT_FROM_RECORD,
    MERGED_DIR,
    load_run_config,
    run_lineage,
    save_head,
)
from mode_cli.config import method, validate
from mode_cli.console import console
from mode_cli.data.splits import legacy_identity, load_splits
from mode_cli.data.tokenizing import IGNORE, Example
from mode_cli.devices import device_type, empty_cache, peak_memory_bytes
from mode_cli.errors import ModeError
from mode_cli.eval.answers import answer_rows, answers_by_default, evaluate_answers
from mode_cli.eval.metrics import training_eval
from mode_cli.eval.render import print_report
from mode_cli.eval.report import EVAL_FOLDER, build_report, save_report
from mode_cli.export.command import export_head, export_run
from mode_cli.files import check_writable_folder
from mode_cli.mode.terms import LossWeights
from mode_cli.mode.weighting import loss_weights
from mode_cli.models import families
from mode_cli.models.loading import (
    attach_adapter,
    load_base_model,
    load_tokenizer,
    resolve_source,
)
from mode_cli.train import checkpoint as checkpoint_mod
from mode_cli.train import extend, start_from
from mode_cli.train.checkpoint import ResumeCandidates, TrainerState, seed_everything
from mode_cli.train.distributed import (
    World,
    gathered,
    load_optimizer_state,
    load_trainable_state,
    optimizer_state,
    restarted_by_torchrun,
    trainable_state,
    wrap,
)
from mode_cli.train.fit import (
    AutoChoice,
    accumulation,
    auto_budget,
    choose_micro_batch,
    confirm_micro_batch,
    data_bytes,
    plan_recipe,
    recipe_setup,
    render_plan,
)
from mode_cli.train.footprint import model_facts, model_facts_apart
from mode_cli.train.heads import build_head
from mode_cli.train.memory import size_text
from mode_cli.train.optim import make_optimizer, make_scheduler, reschedule
from mode_cli.train.plan import plan_run
from mode_cli.train.progress import (
    METRICS_FILE,
    MetricsLog,
    TrainingProgress,
    WandbRun,
    print_summary,
)
from mode_cli.train.steps import BatchStream, TrainingModule, accumulate_gradients
from mode_cli.train.stopping import StopSignals, TrainingInterrupted

T = TypeVar("T")


def default_output_dir(recipe: str) -> Path:
    return Path("outputs") / Path(recipe).stem / datetime.now().strftime("%Y%m%d-%H%M%S")


def resume_command(
    recipe: str, overrides: list[str] | None, out: Path, recipes_dir: Path | None = None
) -> str:
    """`mode train` with a run's own recipe and overrides, its output_dir and resume=auto."""
    words = ["mode", "train", f"recipe={recipe}"]
    if overrides is None:
        words.append("<this run's overrides>")
    else:
        skip = (
            "recipe=",
            "output_dir=",
            "resume=",
            "train.stop_after_steps=",
            "train.max_minutes=",
        )
        words += [o for o in overrides if not o.startswith(skip)]
    words += [f"output_dir={out}", "resume=auto"]
    if recipes_dir is not None:
        words.append(f"--recipes-dir={recipes_dir}")
    return " ".join(w if w.startswith("<") else shlex.quote(w) for w in words)


class FinetuneRecipe:
    """One `mode train` run; `run()` goes setup -> train -> save -> report -> merge."""

    def __init__(
        self,
        cfg: DictConfig,
        overrides: list[str] | None = None,
        recipes_dir: Path | None = None,
        world: World | None = None,
    ) -> None:
        """`overrides` and `recipes_dir`, the command line's, only shape the resume hint; `world`
        is this process's place in a torchrun job (`distributed.init_world`), None alone."""
        validate(cfg)
        self.cfg = cfg
        self.overrides = overrides
        self.recipes_dir = recipes_dir
        self.world = world or World(strategy=cfg.distributed.strategy)
        self.finished = False  # train.max_steps reached (not stopped early)
        self.report_folder: Path | None = None  # where the end-of-training report went
        # Every device choice (device, optimizer, dtypes, the base's placement) is made here.
        self.plan = plan_run(cfg, self.world)
        self.device = self.plan.device
        # Every rank writes (through rank 0) into the folder rank 0 named.
        out = cfg.output_dir or default_output_dir(cfg.recipe or "run")
        self.out = Path(self.world.broadcast(str(out)))
        # The run's counters, saved in every checkpoint and restored whole by a resume.
        self.state = TrainerState()
        # This invocation's own bookkeeping.
        self.resumed_step: int | None = None  # the checkpoint's step, when resumed
        self.resumed_from: Path | None = None  # that checkpoint (pruning keeps it)
        # What a resume takes from its checkpoint (extensions, init_from); a new run's is empty.
        self.lineage = extend.Lineage()
        # init_from of a new run: the source, checked before the model loads.
        self.init_source: start_from.Source | None = None
        self.init_record: dict | None = None  # what init_from.json records
        self.candidates: ResumeCandidates | None = None  # what a resume may continue from
        # An adapter loaded and kept frozen (loss=mode-only): its weights by parameter name.
        self.frozen_adapter: dict[str, torch.Tensor] | None = None
        self.last_checkpoint: Path | None = None
        self.checkpointed_step = -1
        self.checkpoints_written = 0
        self.phase = "done"  # forward | update | done: what an out-of-memory error interrupted
        self.auto: AutoChoice | None = None  # train.micro_batch_size=auto, once chosen
        self._data_identity: dict | None = None
        self._file_damage: dict[Path, str | None] = {}
        self.tracker: WandbRun | None = (
            None  # logger=wandb, rank 0: open from training to the report
        )

    # ------------------------------------------------------------------ setup

    def setup_data(self) -> None:
        """Tokenizer and both splits: all `--dry-run` needs, no model weights."""
        cfg = self.cfg
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        seed_everything(cfg.train.seed)
        self.source = resolve_source(cfg.model)
        self.tokenizer = load_tokenizer(self.source, cfg.model)
        self.train_set, self.eval_set = load_splits(cfg.data, self.tokenizer)

    def setup_model(self) -> None:
        cfg = self.cfg
        seed_everything(cfg.train.seed)
        base = load_base_model(self.source, cfg.model, cfg.train.precision, self.device)
        frozen = self.frozen_adapter_source()
        if not method(cfg).trains_adapter and frozen is None:
            # The MoDE head trains alone on the frozen base: no adapter.
            if cfg.train.gradient_checkpointing:
                base.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False}
                )
            self.model = base
        else:
            self.model = attach_adapter(base, cfg.adapter, cfg.train.gradient_checkpointing)
        if frozen is not None:
            # loss=mode-only over an adapter trained before: the head trains, the adapter stays.
            start_from.load_adapter(frozen, self.model)
            self.model.requires_grad_(False)
            # Its weights as loaded, for adapter/: once wrapped, FSDP holds only shards.
            self.frozen_adapter = {
                name: p.detach().contiguous().cpu().clone()
                for name, p in self.model.named_parameters()
                if "lora_" in name
            }
        self.head = build_head(cfg, self.model, self.device)
        if self.init_source is not None:
            self.load_start_weights()
        # The forward goes through one module, so DDP / FSDP see every trainable parameter.
        self.module = TrainingModule(self.model, self.head)
        self.wrapped = wrap(self.module, self.world)
        # After wrapping: FSDP replaces the parameters with their shards.
        self.optimizer = make_optimizer(cfg, self.model, self.head, self.device, self.plan.sharded)
        self.scheduler = make_scheduler(cfg, self.optimizer)

    # ------------------------------------------------------------------ train.micro_batch_size=auto

    def choose_micro_batch(self) -> None:
        """`train.micro_batch_size=auto`: the largest micro-batch the memory plan fits into
        `train.memory_budget` (`fit.py`; with several processes, the smallest budget of theirs),
        gradient accumulation keeping `train.batch_size`. Recorded in the run's config.yaml."""
        if self.cfg.train.micro_batch_size != "auto":
            return
        budget, source = auto_budget(self.cfg)
        budget = -self.world.max(-int(budget))
        facts = self.world.broadcast(model_facts_apart(self.cfg) if self.world.main else None)
        device = device_type(self.device)
        data = data_bytes(self.train_set.stats.tokens)
        setup = recipe_setup(self.cfg, facts, device, self.world.size, data)
        self.auto = choose_micro_batch(self.cfg, facts, setup, budget, source)
        self.set_micro_batch(self.auto.micro_batch, self.auto.grad_accum_steps)
        console.print(
            f"train.micro_batch_size=auto: {self.auto.micro_batch} (train.grad_accum_steps "
            f"{self.auto.grad_accum_steps}); planned peak {size_text(self.auto.plan.peak)} of "
            f"{size_text(budget)} ({source})",
            soft_wrap=True,
        )

    def confirm_micro_batch(self) -> None:
        """On CUDA, one real forward and backward of a worst-case micro-batch (every position of
        `data.max_seq_len` trained) at the size `auto` chose, halved on an out-of-memory error.
        The weights, the optimizer and the random streams are left as they were. With several
        processes the plan alone decides: a rank out of memory mid-step would leave the others
        waiting in a collective."""
        if self.auto is None or not self.on_cuda or self.world.distributed:
            return
        rng = checkpoint_mod.rng_state(self.device)
        vocab = families.base_of(self.model).config.vocab_size
        self.model.train()

        def try_step(size: int) -> None:
            generator = torch.Generator().manual_seed(size)
            ids = torch.randint(0, vocab, (size, self.cfg.data.max_seq_len), generator=generator)
            batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
            try:
                accumulate_gradients(
                    self.wrapped,
                    [self.to_device(batch)],
                    self.step_weights(1),
                    self.cfg.loss.impl,
                    self.autocast,
                    self.world,
                )
            finally:
                self.optimizer.zero_grad(set_to_none=True)

        chosen = self.cfg.train.micro_batch_size
        size = confirm_micro_batch(
            try_step, chosen, self.cfg.train.batch_size, on_retry=lambda: empty_cache(self.device)
        )
        checkpoint_mod.set_rng_state(rng, self.device)
        empty_cache(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        if size != chosen:
            self.set_micro_batch(size, accumulation(self.cfg, size))
            console.print(
                f"train.micro_batch_size=auto: {chosen} ran out of GPU memory in a probe step; "
                f"{size} (train.grad_accum_steps {self.cfg.train.grad_accum_steps}) did not",
                soft_wrap=True,
            )

    def keep_micro_batch(self, checkpoint: Path) -> None:
        """`train.micro_batch_size=auto` resuming: the run's own micro-batch (the global one over
        this run's processes) and accumulation, as its checkpoint recorded them."""
        if self.cfg.train.micro_batch_size != "auto":
            return
        saved = load_run_config(checkpoint).train
        whole = checkpoint_mod.read_state(checkpoint).get(
            "global_micro_batch", saved.micro_batch_size
        )
        size = whole // self.world.size if whole % self.world.size == 0 else saved.micro_batch_size
        self.set_micro_batch(size, saved.grad_accum_steps)
        console.print(f"train.micro_batch_size=auto: the run's own, {size}")

    def set_micro_batch(self, size: int, accumulation: int) -> None:
        self.cfg.train.micro_batch_size = int(size)
        self.cfg.train.grad_accum_steps = int(accumulation)

    def frozen_adapter_source(self) -> start_from.Source | None:
        """The adapter a run that trains none (loss=mode-only) keeps frozen under its head: a new
        run's init_from adapter, or, resuming, the copy its run folder holds (written when the
        run started; the checkpoints hold only what trains)."""
        if method(self.cfg).trains_adapter:
            return None
        if self.init_source is not None:
            return self.init_source if self.init_source.adapter_file is not None else None
        if self.cfg.init_from is None or self.candidates is None:
            return None
        started = checkpoint_mod.run_folder(self.candidates.paths[0])
        for folder in (self.out, started):
            if (folder / ADAPTER_DIR / start_from.PEFT_CONFIG).is_file():
                return start_from.peft_source(folder / ADAPTER_DIR)
        record = run_lineage(started, self.cfg)["init_from"] or {}
        if (record.get("adapter") or {}).get("use") == "frozen":
            raise ModeError(
                f"cannot resume: the run trains its MoDE head over a frozen adapter, kept in "
                f"{started / ADAPTER_DIR}, which is missing (nothing was changed)"
            )
        return None

    def load_start_weights(self) -> None:
        """init_from: the source's adapter weights (unless kept frozen, loaded already) and its
        MoDE head when it fits the recipe's; what was loaded is recorded with its digest."""
        source = self.init_source
        use = "frozen" if self.frozen_adapter is not None else None
        if source.adapter_file is not None and method(self.cfg).trains_adapter:
            start_from.load_adapter(source, self.model)
            use = "trained"
        state, note = start_from.head_state(
            source, self.head, lambda recipe: build_head(recipe, self.model, "cpu")
        )
        if state is not None:
            self.head.load_state_dict(state)
        if use is None and state is None:
            raise ModeError(
                f"init_from={self.cfg.init_from}: nothing of {source.describe()} carries into "
                f"this run: it has no adapter, and its MoDE head is not used ({note}); nothing "
                "was written"
            )
        self.init_record = start_from.record(source, use, note, state is not None)
        digest = (self.init_record["adapter"] or self.init_record["head"])["sha256"]
        self.refuse_unless_every_rank(
            None
            if digest == self.world.broadcast(digest)
            else f"its copy of {source.path} differs from rank 0's",
            f"cannot start from {source.path}: not every rank reads the same weights",
            "give every machine the same copy of it",
        )

    def has_adapter(self) -> bool:
        """Whether the run's model carries an adapter (trained, or kept frozen)."""
        return method(self.cfg).trains_adapter or self.frozen_adapter is not None

    def trainable_parameters(self) -> dict[str, int]:
        adapter = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        head = sum(p.numel() for p in self.head.parameters()) if self.head else 0
        return {"adapter": adapter, "mode_head": head, "total": adapter + head}

    # ------------------------------------------------------------------ train

    def step_weights(self, step: int) -> LossWeights:
        """The loss terms' weights at this step (a layerwise curriculum changes them)."""
        layers = self.head.layers if self.head is not None else []
        return loss_weights(self.cfg.loss, layers, step, self.cfg.train.max_steps)

    def to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device) for k, v in batch.items()}

    @property
    def on_cuda(self) -> bool:
        return self.plan.on_cuda

    def autocast(self):
        return self.plan.autocast()

    def train(self) -> bool:
        """The loop, from the step after `self.state.step` to train.max_steps.

        Returns True when the run reached train.max_steps, False when it stopped early
        (train.stop_after_steps, train.max_minutes) with a checkpoint to resume from. Ctrl-C or
        SIGTERM: the step finishes, a checkpoint is written, TrainingInterrupted is raised.
        """
        cfg = self.cfg.train
        self.model.train()  # from_pretrained returns eval mode; dropout and bnb need train mode
        trainable = [p for group in self.optimizer.param_groups for p in group["params"]]
        first = self.state.step + 1
        self.started = time.perf_counter()
        stopped_by = None
        main = self.world.main
        if self.cfg.logger == "wandb" and main:
            self.tracker = WandbRun(self.cfg, self.out, self.resumed_step)
        with (
            MetricsLog(
                self.out, self.cfg.logger, self.resumed_step, self.tracker, enabled=main
            ) as log,
            TrainingProgress(cfg.max_steps, console, cfg.log_every, first - 1) as progress,
            StopSignals() as signals,
        ):
            if self.init_record is not None and first == 1:
                # Where init_from's weights start, on the eval split: what carried over.
                result = self.evaluate_now(track_best=False)
                log.write({"step": 0, "eval": result})
                progress.show_eval(0, result)
            for step in range(first, cfg.max_steps + 1):
                # What a checkpoint of step - 1 needs, before this step draws random numbers.
                boundary = {
                    "rng": checkpoint_mod.rng_state(self.device),
                    "position": self.stream.position,
                }
                try:
                    record = self.train_step(step, trainable, boundary)
                    if record is not None and (step % cfg.log_every == 0 or step == cfg.max_steps):
                        log.write(record)
                    if self.cfg.eval.every_steps and step % self.cfg.eval.every_steps == 0:
                        result = self.evaluate_now()
                        log.write({"step": step, "eval": result})
                        progress.show_eval(step, result)
                except torch.OutOfMemoryError:
                    self.out_of_memory(step, boundary)
                self.state.step = step
                if record is not None:
                    self.state.last_loss = record["loss"]
                    progress.update(
                        step,
                        loss=record["loss"],
                        lr=record["lr"],
                        tokens_per_s=record["tokens_per_s"],
                        epoch=self.stream.epochs_done,
                        peak_memory_gb=self.peak_memory_gb(),
                    )
                every = self.cfg.checkpoint.every_steps
                if every and step % every == 0:
                    self.save_checkpoint(step)
                stopped_by = self.stop_reason(signals, step - first + 1)
                if stopped_by:
                    break
        if self.checkpointed_step != self.state.step:
            self.save_checkpoint(self.state.step)
        print_summary(console, self.summary(first))
        signalled = stopped_by in StopSignals.EXIT_CODES_BY_NAME
        if self.state.step == cfg.max_steps and not signalled:
            return True
        hint = f"resume with: {self.resume_command()}"
        console.print(
            f"stopped at step {self.state.step}/{cfg.max_steps} ({stopped_by}); checkpoint "
            f"{self.last_checkpoint}",
            soft_wrap=True,
        )
        if signalled:
            raise TrainingInterrupted(hint, StopSignals.EXIT_CODES_BY_NAME[stopped_by])
        console.print(hint, soft_wrap=True)
        return False

    def resume_command(self) -> str:
        """The command that continues this run: its own overrides, output_dir and resume=auto."""
        return resume_command(self.cfg.recipe, self.overrides, self.out, self.recipes_dir)

    def train_step(self, step: int, trainable: list, boundary: dict) -> dict | None:
        """One optimizer step: forward/backward over its micro-batches, clip, update, schedule.

        Returns the step's metrics record, or None for a non-finite step that was skipped."""
        cfg = self.cfg.train
        self.phase = "forward"
        micro = [self.to_device(self.stream.next()) for _ in range(cfg.grad_accum_steps)]
        result = accumulate_gradients(
            self.wrapped,
            micro,
            self.step_weights(step),
            self.cfg.loss.impl,
            self.autocast,
            self.world,
        )
        grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm or math.inf))
        finite = math.isfinite(result.loss) and math.isfinite(grad_norm)
        if not finite and cfg.on_nonfinite == "stop":
            self.optimizer.zero_grad(set_to_none=True)
            self.stop_on_nonfinite(step, result.loss, grad_norm, boundary)
        if finite:
            self.phase = "update"  # an OOM in here may leave a half-updated optimizer
            self.optimizer.step()
        else:
            self.state.skipped_steps += 1
            console.print(
                f"step {step}: loss {result.loss}, gradient norm {grad_norm}: update skipped "
                f"({self.state.skipped_steps} so far)"
            )
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.phase = "done"
        self.state.seen_tokens += result.tokens
        if not finite:
            return None
        elapsed = self.elapsed()
        return {
            "step": step,
            "loss": result.loss,
            **result.parts,
            "lr": lr,
            "grad_norm": grad_norm,
            "target_tokens": result.target_tokens,
            "tokens_per_s": self.state.seen_tokens / max(elapsed, 1e-9),
            "elapsed_s": elapsed,
            **({"peak_memory_gb": self.peak_memory_gb()} if self.on_cuda else {}),
        }

    def evaluate_now(self, track_best: bool = True) -> dict:
        """Eval-split losses of the final layer, each selected layer and the ensemble, and the
        mean router weights (eval mode: no dropout, so the training RNG is not touched).
        `track_best`: the result counts for the best eval loss of the training."""
        with gathered(self.module, self.world):
            result = training_eval(
                self.model, self.head, self.eval_set, self.tokenizer, self.device, self.cfg.eval
            )
        score = result["ensemble"] if result["ensemble"] is not None else result["final"]
        if not track_best:
            return result
        if self.state.best_eval_loss is None or score < self.state.best_eval_loss:
            self.state.best_eval_loss = score
        return result

    def stop_reason(self, signals: StopSignals, steps_done: int) -> str | None:
        """Why the run stops after this step, or None; every rank agrees (the reason with the
        highest priority any rank sees: a signal, then the step budget, then the time budget)."""
        cfg = self.cfg.train
        reasons = [
            None,
            f"train.max_minutes={cfg.max_minutes}",
            f"train.stop_after_steps={cfg.stop_after_steps}",
            "SIGTERM",
            "SIGINT",
        ]
        code = 0
        if signals.received is not None:
            code = reasons.index(signal.Signals(signals.received).name)
        elif cfg.stop_after_steps and steps_done >= cfg.stop_after_steps:
            code = 2
        elif cfg.max_minutes and time.perf_counter() - self.started >= cfg.max_minutes * 60:
            code = 1
        return reasons[self.world.max(code)]

    def stop_on_nonfinite(self, step: int, loss: float, grad_norm: float, boundary: dict) -> None:
        """Keep the state before this step as a checkpoint, then stop with a clear message."""
        if step > 1 and self.checkpointed_step != step - 1:
            self.save_checkpoint(step - 1, **boundary)
        raise ModeError(
            f"the loss became {loss} (gradient norm {grad_norm}) at step {step}. The model before "
            f"that step is in {self.last_checkpoint or 'no checkpoint (it was the first step)'}. "
            "Lower train.lr or check the data; or continue with resume=auto "
            "train.on_nonfinite=skip to drop such steps"
        )

    def out_of_memory(self, step: int, boundary: dict) -> None:
        """Free what the step held, keep a checkpoint when the state is whole, name the knobs.

        With several processes the others are waiting in a collective for this one: no
        checkpoint (it would need them), the last one stays."""
        self.optimizer.zero_grad(set_to_none=True)
        empty_cache(self.device)
        alone = not self.world.distributed
        if alone and self.phase == "forward" and step > 1 and self.checkpointed_step != step - 1:
            # The step died before the optimizer touched anything: the state is step - 1's.
            self.save_checkpoint(step - 1, **boundary)
        elif alone and self.phase == "done":  # the update went through; the eval after it ran out
            self.state.step = step
            self.save_checkpoint(step)
        raise ModeError(self.plan.out_of_memory(self.cfg, step, self.last_checkpoint)) from None

    def peak_memory_gb(self) -> float | None:
        """This process's peak CUDA memory (each rank has its own GPU); None on the CPU."""
        peak = peak_memory_bytes(self.device)
        return None if peak is None else peak / 2**30

    def elapsed(self) -> float:
        """Training seconds of the whole run, earlier invocations included (`state.elapsed_s` is
        what the checkpoint this invocation resumed from recorded)."""
        return self.state.elapsed_s + time.perf_counter() - self.started

    def summary(self, first: int) -> dict:
        last = self.state.step
        return {
            "steps": f"{first}-{last} of {self.cfg.train.max_steps}" if last >= first else "none",
            "final loss": self.state.last_loss,
            "best eval loss": self.state.best_eval_loss,
            "tokens/s": self.state.seen_tokens / max(self.elapsed(), 1e-9),
            "wall time (s)": self.elapsed(),
            "skipped steps": self.state.skipped_steps,
            "peak memory (GB)": self.peak_memory_gb(),
            "checkpoints written": self.checkpoints_written,
            "latest checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
        }

    # ------------------------------------------------------------------ checkpoints and resume

    def save_checkpoint(self, step: int, rng: dict | None = None, position: dict | None = None):
        """The resumable state after `step`; `rng`/`position` default to the current ones.

        Every rank takes part (gathering sharded weights and the ranks' RNG states is collective);
        rank 0 writes, in the single-process format."""
        position = position or self.stream.position
        weights = trainable_state(self.module, self.world)
        optimizer = optimizer_state(self.module, self.optimizer, self.world)
        rngs = self.world.gather(rng or checkpoint_mod.rng_state(self.device))
        if self.world.main:
            adapter, head = weights
            contents = checkpoint_mod.Contents(
                adapter=adapter,
                head=head,
                optimizer=optimizer,
                scheduler=self.scheduler.state_dict(),
                rng=rngs[0],
                rank_rngs=rngs[1:],
            )
            checkpoint_mod.save_checkpoint(
                self.out,
                contents,
                state=replace(self.state, step=step, elapsed_s=self.elapsed(), **position),
                extra={
                    "max_steps": self.cfg.train.max_steps,
                    "data": self.data_identity(),
                    "global_micro_batch": self.cfg.train.micro_batch_size * self.world.size,
                    "processes": self.world.size,
                },
                cfg=self.cfg,
                keep=self.cfg.checkpoint.keep,
                resumed_from=self.resumed_from,
            )
        self.last_checkpoint = checkpoint_mod.checkpoint_dir(self.out, step)
        self.checkpointed_step = step
        self.checkpoints_written += 1

    def data_identity(self) -> dict:
        """The training examples' count and a digest of their tokens, order and packing
        (`SplitExamples.identity`): a resume must see the same."""
        if self._data_identity is None:
            self._data_identity = self.train_set.examples.identity()
        return self._data_identity

    def agreed(self, decide: Callable[[], T]) -> T:
        """Rank 0's answer to `decide()`, on every rank (a single process's own).

        What the ranks start from is decided once: on machines without one shared file system
        they could each see other checkpoints. Rank 0's refusal stops every rank with its message
        (each machine's log says why)."""
        if not self.world.distributed:
            return decide()
        answer, refusal = None, None
        if self.world.main:
            try:
                answer = decide()
            except ModeError as err:
                refusal = (str(err), err.exit_code)
        answer, refusal = self.world.broadcast((answer, refusal))
        if refusal is not None:
            raise ModeError(*refusal)
        return answer

    def find_checkpoint(self) -> tuple[ResumeCandidates | None, extend.Lineage]:
        """The checkpoints `resume=` asks for, newest first from the newest whose files are intact
        (damaged ones named and skipped, see checkpoint.py), that one checked against this
        recipe, and what the run takes from it (`extend.Lineage`); None: a new run (refused
        where the run folder holds one already). Nothing here loads a model: a refusal is
        quick. Rank 0 decides for every rank (`agreed`)."""
        resume = self.cfg.resume
        extending = self.cfg.train.extend
        if resume is None:
            if (self.out / "config.yaml").exists():
                raise ModeError(
                    f"{self.out} already holds a run; pick another output_dir (nothing was "
                    "changed), continue it with resume=auto, or train it on to more steps with "
                    "resume=auto train.max_steps=N train.extend=replan|restart"
                )
            return None, extend.Lineage()
        if resume == "auto" and self.cfg.output_dir is None:
            raise ModeError("resume=auto needs output_dir=DIR: the run folder to continue")
        candidates = checkpoint_mod.resume_candidates(resume, self.out)
        if resume != "auto" and self.cfg.output_dir is None:
            # resume=PATH alone continues that run in its own folder.
            self.out = checkpoint_mod.run_folder(candidates.paths[0])
        if resume != "auto" and restarted_by_torchrun():
            # torchrun reran the job's command after a failure: PATH is where the job started,
            # the run has gone on since. Continue from its newest checkpoint (those after PATH's
            # step that the job found were dropped when it resumed: all are the job's own).
            newest = checkpoint_mod.resume_candidates("auto", self.out).paths
            candidates = ResumeCandidates(
                newest + [path for path in candidates.paths if path not in newest], explicit=False
            )
        if not candidates.paths:
            if (self.out / "config.yaml").exists() and extending:
                raise ModeError(
                    f"train.extend={extending}: {self.out} holds a run but no complete checkpoint "
                    f"under {self.out / checkpoint_mod.CHECKPOINTS}: the final adapter alone has "
                    "no optimizer state or data position to continue. Start a new run from its "
                    f"weights instead: init_from={self.out} output_dir=<another folder> "
                    "(nothing was changed)"
                )
            if (self.out / "config.yaml").exists():
                raise ModeError(
                    f"resume=auto: {self.out} holds a run but no complete checkpoint under "
                    f"{self.out / checkpoint_mod.CHECKPOINTS}, so it cannot be continued; start "
                    "again in another output_dir (nothing was changed)"
                )
            if extending:
                raise ModeError(
                    f"train.extend={extending}: {self.out} holds no run to extend; name the run "
                    "folder with output_dir=, or leave train.extend out to start a new run "
                    "(nothing was changed)"
                )
            console.print(
                f"resume=auto: no run in {self.out} yet, starting a new one", soft_wrap=True
            )
            return None, extend.Lineage()
        candidates = checkpoint_mod.first_intact(candidates, self.file_damage)
        self.keep_micro_batch(candidates.paths[0])
        lineage = checkpoint_mod.check_compatible(candidates.paths[0], self.cfg, self.world.size)
        return candidates, lineage

    def file_damage(self, path: Path) -> str | None:
        """`checkpoint.file_damage`, once per checkpoint (it reads every byte for the checksums)."""
        if path not in self._file_damage:
            self._file_damage[path] = checkpoint_mod.file_damage(path, self.cfg)
        return self._file_damage[path]

    def intact_checkpoint(self, candidates: ResumeCandidates) -> tuple[Path, extend.Lineage]:
        """The newest candidate whose files are intact and whose tensors fit the model built, and
        what the run takes from it."""
        chosen = checkpoint_mod.first_intact(
            candidates,
            lambda path: (
                self.file_damage(path)
                or checkpoint_mod.weights_mismatch(path, self.model, self.head)
            ),
        ).paths[0]
        if chosen != candidates.paths[0]:
            return chosen, checkpoint_mod.check_compatible(chosen, self.cfg, self.world.size)
        return chosen, self.lineage

    def new_stream(self, epoch: int = 0, index: int = 0) -> BatchStream:
        cfg = self.cfg.train
        return BatchStream(
            self.train_set.examples,
            cfg.micro_batch_size,
            cfg.seed,
            self.tokenizer.pad_token_id,
            epoch,
            index,
            shard=(self.world.rank, self.world.size),
        )

    def start_new_run(self) -> None:
        self.stream = self.new_stream()
        if self.world.rank:
            # Each rank's own random stream (dropout); rank 0 draws as a single process does.
            seed_everything(self.cfg.train.seed + self.world.rank)
        console.print(self.start_words(), soft_wrap=True, highlight=False)
        # The run folder appears only once everything a user can get wrong has been checked.
        if self.world.main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(OmegaConf.to_yaml(self.cfg, resolve=True))
            if self.init_record is not None:
                record = json.dumps(self.init_record, indent=2) + "\n"
                (self.out / INIT_FROM_RECORD).write_text(record)
            if self.frozen_adapter is not None:
                # Final already (it does not train), and what a resume of this run reloads.
                self.model.save_pretrained(self.out / ADAPTER_DIR, state_dict=self.frozen_adapter)
                self.tokenizer.save_pretrained(self.out / ADAPTER_DIR)

    def start_words(self) -> str:
        """What a new run starts from, in words: fresh weights, or init_from's."""
        trained = ["adapter"] if method(self.cfg).trains_adapter else []
        trained += ["MoDE head"] if self.head is not None else []
        last = self.cfg.train.max_steps
        steps = f"steps 1-{last}" if last > 1 else "step 1"
        new = f"the optimizer, schedule and data position, {steps}"
        if self.init_record is None:
            return f"new run: fresh {' and '.join(trained)}; {new}"
        return start_from.describe_start(
            self.init_source, self.init_record, trained=trained, new=new
        )

    def check_every_rank_has(self, path: Path) -> None:
        """Every rank has the checkpoint rank 0 chose, with the same files (on machines of their
        own each reads its own copy of output_dir); else every rank stops, and the message
        names the ranks that lack it."""
        if not self.world.distributed:
            return
        expected = self.world.broadcast(
            checkpoint_mod.fingerprint(path) if self.world.main else None
        )
        problem = None
        if not checkpoint_mod.is_complete(path):
            problem = f"it has no complete checkpoint {path}"
        elif checkpoint_mod.fingerprint(path) != expected:
            problem = f"its copy of {path} differs from rank 0's"
        self.refuse_unless_every_rank(
            problem,
            f"cannot resume from {path}, rank 0's choice: not every rank has it",
            "give every machine the same output_dir on a shared file system, or copy the run "
            "folder to each",
        )

    def refuse_unless_every_rank(self, problem: str | None, refusal: str, remedy: str) -> None:
        """Stop every rank when any rank found a `problem` (each rank's own view of the files);
        the message names the ranks and their problems."""
        if not self.world.distributed:
            return
        found = self.world.gather(problem)
        problems = self.world.broadcast(
            [f"rank {rank}: {why}" for rank, why in enumerate(found) if why]
            if self.world.main
            else None
        )
        if problems:
            raise ModeError(
                f"{refusal}\n"
                + "\n".join(f"  - {line}" for line in problems)
                + f"\n{remedy} (nothing was changed)"
            )

    def resume_from(self, path: Path) -> None:
        """Weights, optimizer, schedule, counters, data position and, last, the RNG states."""
        contents, record = checkpoint_mod.read_checkpoint(
            path, model=self.model, head=self.head, rank=self.world.rank
        )
        saved = record["data"]
        # A checkpoint of mode 0.1 identified the data by a digest of every example's tokens.
        now = self.data_identity() if "version" in saved else legacy_identity(self.train_set)
        if saved != now:
            raise ModeError(
                f"cannot resume from {path}: the training data differ from the checkpoint's "
                f"({saved} there, {now} now)"
            )
        load_trainable_state(self.module, self.world, contents.adapter, contents.head)
        try:
            load_optimizer_state(self.module, self.optimizer, self.world, contents.optimizer)
            self.scheduler.load_state_dict(contents.scheduler)
        except (ValueError, KeyError, TypeError, IndexError) as err:
            # torch's own checks of a state dict of another run, or of something else
            raise ModeError(
                f"cannot resume from {path}: its optimizer or schedule state does not match this "
                f"run ({err})"
            ) from None
        source = checkpoint_mod.run_folder(path)
        if self.world.main and not (self.out / "config.yaml").exists():
            self.out.mkdir(parents=True, exist_ok=True)
            # A checkpoint of another run folder, continued here: start from its history.
            (self.out / "config.yaml").write_text(OmegaConf.to_yaml(self.cfg, resolve=True))
            if (source / METRICS_FILE).is_file():
                shutil.copyfile(source / METRICS_FILE, self.out / METRICS_FILE)
            for kept in (INIT_FROM_RECORD, ADAPTER_DIR):
                # What the run started from, and the adapter a mode-only run keeps frozen.
                if (source / kept).is_file():
                    shutil.copyfile(source / kept, self.out / kept)
                elif self.frozen_adapter is not None and (source / kept).is_dir():
                    shutil.copytree(source / kept, self.out / kept)
        self.state = TrainerState.from_record(record)
        self.resumed_step = self.checkpointed_step = self.state.step
        self.last_checkpoint = self.resumed_from = path
        extension = self.lineage.extended
        if extension is not None:
            # The next step's learning rate comes from the extended schedule.
            reschedule(self.scheduler)
            if self.world.main:
                # The run's recipe now says how far it goes, and since when.
                (self.out / "config.yaml").write_text(OmegaConf.to_yaml(self.cfg, resolve=True))
        if self.world.main:
            dropped = checkpoint_mod.drop_superseded(self.out, self.state.step)
            if dropped:
                console.print(
                    f"dropped {', '.join(p.name for p in dropped)}: the run continues from step "
                    f"{self.state.step} and rewrites what came after it",
                    soft_wrap=True,
                )
        self.stream = self.new_stream(self.state.epoch, self.state.index)
        console.print(
            f"resuming from {path} (step {self.state.step}/{self.cfg.train.max_steps})",
            soft_wrap=True,
        )
        position = f"epoch {self.state.epoch}, micro-batch {self.state.index}"
        if extension is not None:
            words = extend.describe(
                extension, self.cfg, position=position, next_lr=self.scheduler.get_last_lr()[0]
            )
        elif self.state.step >= self.cfg.train.max_steps:
            words = (
                f"resume: the run finished at step {self.state.step}; its final adapter, head, "
                "merged model and report are written again (to train it on: a larger "
                "train.max_steps with train.extend=replan|restart)"
            )
        else:
            weights = ["the adapter"] if self.has_adapter() else []
            weights += ["the MoDE head"] if self.head is not None else []
            words = (
                f"resume: continues at step {self.state.step + 1} of "
                f"{self.cfg.train.max_steps}. Carried over: {', '.join(weights)}, optimizer "
                f"state, schedule, step count, data position ({position}) and random state: the "
                "losses of an uninterrupted run"
            )
        console.print(words, soft_wrap=True, highlight=False)
        # Last: nothing may draw random numbers between here and the first resumed step.
        checkpoint_mod.restore_rng(contents.rng, self.device, self.cfg.train.seed, self.world.rank)

    # ------------------------------------------------------------------ outputs

    def save(self) -> None:
        """The adapter (peft format, with the tokenizer) and the MoDE head (safetensors + json),
        gathered from every rank and written by rank 0."""
        weights = trainable_state(self.module, self.world)
        if not self.world.main:
            return
        adapter, head = weights
        if method(self.cfg).trains_adapter:
            self.model.save_pretrained(self.out / ADAPTER_DIR, state_dict=adapter)
            self.tokenizer.save_pretrained(self.out / ADAPTER_DIR)
        if self.head is not None:
            save_head(self.head, self.out, state=head)

    def report(self) -> dict | None:
        """The eval report (per-layer metrics, answer accuracy) into `<out>/eval/<time>/`.

        Rank 0 measures its own replica; with a sharded model every rank takes part (each layer
        is gathered in turn) and answer accuracy, which decodes token by token, is left to
        `mode eval`. Returns the report on rank 0."""
        if not (self.world.main or self.world.sharded):
            return None
        answers = None
        try:
            rows = answer_rows(self.cfg, auto=answers_by_default(self.cfg, self.model))
        except ModeError as err:
            # The adapter is saved already: report without answers rather than stop here.
            console.print(f"[yellow]no answer accuracy:[/yellow] {err}")
            rows = None
        if rows and self.world.sharded:
            console.print(
                "no answer accuracy with distributed.strategy=fsdp: run `mode eval` on the run "
                "folder for it"
            )
        elif rows:
            console.print(f"answer accuracy: greedy answers to {len(rows)} eval rows")
            trained_adapter = self.has_adapter()
            answers = evaluate_answers(
                self.cfg,
                self.model,
                self.head,
                self.tokenizer,
                self.device,
                rows,
                source=self.source,
                adapter=self.out / ADAPTER_DIR if trained_adapter else None,
                base=self.cfg.eval.compare_base,
            )
        with gathered(self.module, self.world):
            report = build_report(
                self.cfg,
                self.model,
                self.head,
                self.eval_set,
                self.tokenizer,
                self.device,
                source={"kind": "run", "checkpoint": str(self.out), "step": self.state.step},
                answers=answers,
                lineage=run_lineage(self.out, self.cfg),
            )
        if not self.world.main:
            return None
        parent = Path(self.cfg.eval.output_dir or self.out / EVAL_FOLDER)
        self.report_folder = save_report(report, parent)
        if self.tracker is not None:
            self.tracker.log_report(report, self.report_folder)
        print_report(report, console)
        console.print(f"report: {self.report_folder}")
        return report

    def merge(self) -> Path:
        """The merged model (`merged/`, the export to deploy), by rank 0 alone once every rank is
        done with its training model (with a sharded model, on the CPU: the whole model may not
        fit one device)."""
        del self.wrapped, self.module, self.model, self.optimizer
        empty_cache(self.device)
        device = "cpu" if self.world.sharded else self.device
        return export_run(self.out, self.out / MERGED_DIR, self.cfg, device)

    def check_output_folders(self) -> None:
        """The run folder (and a report folder elsewhere) can be created: checked before any
        work, so a bad path fails at once and leaves nothing behind."""
        check_writable_folder(self.out, "output_dir")
        if self.cfg.eval.output_dir:
            check_writable_folder(Path(self.cfg.eval.output_dir), "eval.output_dir")

    def run(self) -> Path:
        """Setup, train, save, report, merge; a W&B run it opened is finished whatever happens."""
        try:
            out = self.run_stages()
        except BaseException:
            if self.tracker is not None:
                self.tracker.finish(failed=True)
            raise
        if self.tracker is not None:
            self.tracker.finish()
        return out

    def run_stages(self) -> Path:
        self.check_output_folders()
        checked = self.out
        candidates, self.lineage, self.out = self.agreed(
            lambda: (*self.find_checkpoint(), self.out)
        )
        self.candidates = candidates
        if self.out != checked:  # resume=PATH alone continues in the checkpoint's run folder
            self.check_output_folders()
        if candidates is not None:
            # The extensions (and init_from) the checkpoint records shape the schedule built next.
            extend.apply(self.cfg, self.lineage)
        # Every rank has looked at the folder before rank 0 writes into it.
        self.world.barrier()
        console.print(f"[bold]mode train[/bold] {self.cfg.recipe} -> {self.out}")
        self.setup_data()
        if candidates is None and self.cfg.init_from is not None:
            # Every difference from the source refused before the model loads.
            self.init_source = self.agreed(lambda: start_from.check(self.cfg, self.source))
        self.choose_micro_batch()
        self.setup_model()
        self.confirm_micro_batch()
        if candidates is None:
            self.start_new_run()
        else:
            chosen, lineage = self.agreed(lambda: self.intact_checkpoint(candidates))
            self.check_every_rank_has(chosen)
            if lineage != self.lineage:  # an older checkpoint than the one checked first
                self.lineage = lineage
                extend.apply(self.cfg, lineage)
                self.scheduler = make_scheduler(self.cfg, self.optimizer)
            self.resume_from(chosen)
        counts = self.trainable_parameters()
        processes = (
            f"; {self.world.size} processes ({self.world.strategy})"
            if self.world.distributed
            else ""
        )
        if self.world.main:
            describe_data(self)
        console.print(
            f"{len(self.train_set.examples)} train / {len(self.eval_set.examples)} eval examples; "
            f"trainable parameters: {counts['adapter']:,} adapter + {counts['mode_head']:,} "
            f"MoDE head; {self.plan.summary()}{processes}"
        )
        self.finished = self.train()
        if not self.finished:
            return self.out  # stopped early, with a checkpoint to resume from
        self.save()
        self.report()
        # From here on rank 0 works alone: the others are done. They do not wait for it in a
        # collective: under DDP rank 0 has just measured the report (answers included) alone, and
        # a long report would outlast distributed.timeout_s.
        if not self.world.main:
            return self.out
        if self.cfg.merge.enabled:
            merged = self.merge()
            console.print(f"merged model ({self.cfg.merge.base} base): {merged}")
            console.print(deploy_note(self.cfg, merged), soft_wrap=True)
        console.print(f"[bold green]done[/bold green] in {self.out}")
        return self.out


def deploy_note(cfg: DictConfig, merged: Path) -> str:
    """What the merged folder is, in one line: which head it decodes with and how to load it."""
    if export_head(cfg) == "ensemble":
        return (
            f"{merged} decodes with the MoDE ensemble: deploy it, loaded with "
            "trust_remote_code=True (`mode export head=final` gives a plain final-layer model)"
        )
    return f"{merged} is a plain transformers model: it decodes with the final layer"


def dry_run(cfg: DictConfig, memory: str | None = None) -> dict:
    """Compose, validate, tokenize the data; show one example, the counts and the memory plan
    (`fit.py`; `memory`: its budget, default this machine's). No weights loaded beyond the
    model's config (and a scaled-down random stand-in the plan measures), no training."""
    recipe = FinetuneRecipe(cfg)
    recipe.setup_data()
    if cfg.init_from is not None:
        source = start_from.check(cfg, recipe.source)
        console.print(f"init_from: {source.describe()} fits this recipe", soft_wrap=True)
    facts = model_facts(cfg)
    counts = {"adapter": sum(facts.params.adapter), "mode_head": facts.params.head}
    counts["total"] = counts["adapter"] + counts["mode_head"]
    for format, example in recipe.train_set.examples.first_of_each_format().items():
        show_example(recipe.tokenizer, example, format)
    for end in recipe.train_set.reply_ends:
        if end.problem is None:
            console.print(f"end of a reply: {end.describe()}", soft_wrap=True, highlight=False)
    describe_data(recipe)
    console.print(
        f"trainable parameters: {counts['adapter']:,} adapter + {counts['mode_head']:,} MoDE head "
        f"= {counts['total']:,}"
    )
    plan, choice = plan_recipe(
        cfg, memory, facts=facts, data=data_bytes(recipe.train_set.stats.tokens)
    )
    console.print(render_plan(plan, cfg.recipe, choice))
    console.print("[bold]dry run[/bold]: recipe valid, data ready; no training done")
    return {
        "train_examples": len(recipe.train_set.examples),
        "eval_examples": len(recipe.eval_set.examples),
        "train_tokens": recipe.train_set.stats.tokens,
        "trainable": counts,
        "memory": plan.to_dict(),
    }


def describe_data(recipe: FinetuneRecipe) -> None:
    """What the data came to, a line per split (in the dry run and the run's log)."""
    max_seq_len = recipe.cfg.data.max_seq_len
    for name, split in (("train", recipe.train_set), ("eval", recipe.eval_set)):
        cached = "; from the cache" if split.stats.cached else ""
        console.print(f"{name}: {split.stats.describe(max_seq_len)}{cached}", soft_wrap=True)


def show_example(tokenizer, example: Example, format: str = "") -> None:
    """One formatted example: the masked prompt dim, the trained response highlighted."""
    from rich.markup import escape
    from rich.text import Text

    text = Text()
    # Without colours (a pipe, a log file) the trained span is bracketed instead.
    plain = not console.is_terminal
    trained = [label != IGNORE for label in example.labels]
    for i, token_id in enumerate(example.input_ids):
        piece = tokenizer.decode([token_id])
        if plain and trained[i] and (i == 0 or not trained[i - 1]):
            piece = "[[" + piece
        if plain and trained[i] and (i + 1 == len(trained) or not trained[i + 1]):
            piece = piece + "]]"
        text.append(piece, style="bold green" if trained[i] else "dim")
    legend = escape("[[trained]]") if plain else "[bold green]green[/bold green]"
    kind = f" ({format})" if format else ""
    console.print(f"[bold]example{kind}[/bold] (dim: prompt, masked; {legend}: response, trained):")
    console.print(text)
