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
"""

from __future__ import annotations

import hashlib
import math
import random
import shlex
import shutil
import signal
import time
from contextlib import nullcontext
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from mode_cli.artifacts import ADAPTER_DIR, load_run_config, save_head, save_merged
from mode_cli.config import method, validate
from mode_cli.console import console
from mode_cli.data.splits import load_splits
from mode_cli.data.tokenizing import IGNORE, Example
from mode_cli.errors import ModeError
from mode_cli.eval.answers import answer_rows, answers_by_default, evaluate_answers
from mode_cli.eval.metrics import training_eval
from mode_cli.eval.render import print_report
from mode_cli.eval.report import EVAL_FOLDER, build_report, save_report
from mode_cli.files import check_writable_folder
from mode_cli.mode.terms import LossWeights
from mode_cli.mode.weighting import loss_weights
from mode_cli.models import families
from mode_cli.models.loading import (
    attach_adapter,
    load_base_model,
    load_tokenizer,
    one_allocator_arena,
    resolve_device,
    resolve_source,
)
from mode_cli.train import checkpoint as checkpoint_mod
from mode_cli.train.checkpoint import ResumeCandidates, TrainerState
from mode_cli.train.distributed import (
    World,
    gathered,
    load_optimizer_state,
    load_trainable_state,
    optimizer_state,
    trainable_state,
    wrap,
)
from mode_cli.train.fit import (
    AutoChoice,
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
from mode_cli.train.optim import make_optimizer, make_scheduler
from mode_cli.train.progress import (
    METRICS_FILE,
    MetricsLog,
    TrainingProgress,
    WandbRun,
    print_summary,
)
from mode_cli.train.steps import BatchStream, TrainingModule, accumulate_gradients
from mode_cli.train.stopping import StopSignals, TrainingInterrupted


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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
        self.device = self.world.device(resolve_device(cfg.train.device))
        # Every rank writes (through rank 0) into the folder rank 0 named.
        out = cfg.output_dir or default_output_dir(cfg.recipe or "run")
        self.out = Path(self.world.broadcast(str(out)))
        # The run's counters, saved in every checkpoint and restored whole by a resume.
        self.state = TrainerState()
        # This invocation's own bookkeeping.
        self.resumed_step: int | None = None  # the checkpoint's step, when resumed
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
        if torch.device(self.device).type == "cpu":
            one_allocator_arena()  # a steady peak, the one the memory plan foresees
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
        if not method(cfg).trains_adapter:
            # The MoDE head trains alone on the frozen base: no adapter.
            if cfg.train.gradient_checkpointing:
                base.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False}
                )
            self.model = base
        else:
            self.model = attach_adapter(base, cfg.adapter, cfg.train.gradient_checkpointing)
        self.head = build_head(cfg, self.model, self.device)
        # The forward goes through one module, so DDP / FSDP see every trainable parameter.
        self.module = TrainingModule(self.model, self.head)
        self.wrapped = wrap(self.module, self.world)
        # After wrapping: FSDP replaces the parameters with their shards.
        self.optimizer = make_optimizer(cfg, self.model, self.head, self.device)
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
        device = torch.device(self.device).type
        data = data_bytes(self.train_set.examples)
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
        rng = checkpoint_mod.rng_state()
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
            try_step, chosen, self.cfg.train.batch_size, on_retry=torch.cuda.empty_cache
        )
        checkpoint_mod.set_rng_state(rng)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        if size != chosen:
            batch = self.cfg.train.batch_size
            self.set_micro_batch(size, batch // size if batch else self.cfg.train.grad_accum_steps)
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
        return torch.device(self.device).type == "cuda"

    def autocast(self):
        if self.cfg.train.precision == "bf16":
            return torch.autocast(device_type=torch.device(self.device).type, dtype=torch.bfloat16)
        return nullcontext()

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
            for step in range(first, cfg.max_steps + 1):
                # What a checkpoint of step - 1 needs, before this step draws random numbers.
                boundary = {"rng": checkpoint_mod.rng_state(), "position": self.stream.position}
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

    def evaluate_now(self) -> dict:
        """Eval-split losses of the final layer, each selected layer and the ensemble, and the
        mean router weights (eval mode: no dropout, so the training RNG is not touched)."""
        with gathered(self.module, self.world):
            result = training_eval(
                self.model, self.head, self.eval_set, self.tokenizer, self.device, self.cfg.eval
            )
        score = result["ensemble"] if result["ensemble"] is not None else result["final"]
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
        if self.on_cuda:
            torch.cuda.empty_cache()
        alone = not self.world.distributed
        if alone and self.phase == "forward" and step > 1 and self.checkpointed_step != step - 1:
            # The step died before the optimizer touched anything: the state is step - 1's.
            self.save_checkpoint(step - 1, **boundary)
        elif alone and self.phase == "done":  # the update went through; the eval after it ran out
            self.state.step = step
            self.save_checkpoint(step)
        cfg = self.cfg
        raise ModeError(
            f"out of GPU memory at step {step}. Lower memory with train.micro_batch_size "
            f"(now {cfg.train.micro_batch_size}; raise train.grad_accum_steps to keep the batch), "
            f"data.max_seq_len (now {cfg.data.max_seq_len}) or "
            f"train.gradient_checkpointing=true (now {str(cfg.train.gradient_checkpointing).lower()}"
            "; a run can be resumed with it changed). Last checkpoint: "
            f"{self.last_checkpoint or 'none'}"
        ) from None

    def peak_memory_gb(self) -> float | None:
        """This process's peak CUDA memory (each rank has its own GPU)."""
        return torch.cuda.max_memory_allocated(self.device) / 2**30 if self.on_cuda else None

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
        rngs = self.world.gather(rng or checkpoint_mod.rng_state())
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
            )
        self.last_checkpoint = checkpoint_mod.checkpoint_dir(self.out, step)
        self.checkpointed_step = step
        self.checkpoints_written += 1

    def data_identity(self) -> dict:
        """The training examples' count and a digest of their tokens: a resume must see the same."""
        if self._data_identity is None:
            digest = hashlib.sha256()
            for example in self.train_set.examples:
                digest.update(np.asarray(example.input_ids, dtype=np.int64).tobytes())
                digest.update(np.asarray(example.labels, dtype=np.int64).tobytes())
            self._data_identity = {
                "train_examples": len(self.train_set.examples),
                "sha256": digest.hexdigest()[:16],
            }
        return self._data_identity

    def find_checkpoint(self) -> ResumeCandidates | None:
        """The checkpoints `resume=` asks for, newest first from the newest whose files are intact
        (damaged ones named and skipped, see checkpoint.py), that one checked against this
        recipe; None: a new run. Nothing here loads a model: a refusal is quick."""
        resume = self.cfg.resume
        if resume is None:
            return None
        if resume == "auto" and self.cfg.output_dir is None:
            raise ModeError("resume=auto needs output_dir=DIR: the run folder to continue")
        candidates = checkpoint_mod.resume_candidates(resume, self.out)
        if resume != "auto" and self.cfg.output_dir is None:
            # resume=PATH alone continues that run in its own folder.
            self.out = checkpoint_mod.run_folder(candidates.paths[0])
        if not candidates.paths:
            if (self.out / "config.yaml").exists():
                raise ModeError(
                    f"resume=auto: {self.out} holds a run but no complete checkpoint under "
                    f"{self.out / checkpoint_mod.CHECKPOINTS}, so it cannot be continued; start "
                    "again in another output_dir (nothing was changed)"
                )
            console.print(
                f"resume=auto: no run in {self.out} yet, starting a new one", soft_wrap=True
            )
            return None
        candidates = checkpoint_mod.first_intact(candidates, self.file_damage)
        self.keep_micro_batch(candidates.paths[0])
        checkpoint_mod.check_compatible(candidates.paths[0], self.cfg, self.world.size)
        return candidates

    def file_damage(self, path: Path) -> str | None:
        """`checkpoint.file_damage`, once per checkpoint (it reads every byte for the checksums)."""
        if path not in self._file_damage:
            self._file_damage[path] = checkpoint_mod.file_damage(path, self.cfg)
        return self._file_damage[path]

    def intact_checkpoint(self, candidates: ResumeCandidates) -> Path:
        """The newest candidate whose files are intact and whose tensors fit the model built."""
        chosen = checkpoint_mod.first_intact(
            candidates,
            lambda path: (
                self.file_damage(path)
                or checkpoint_mod.weights_mismatch(path, self.model, self.head)
            ),
        ).paths[0]
        if chosen != candidates.paths[0]:
            checkpoint_mod.check_compatible(chosen, self.cfg, self.world.size)
        return chosen

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
        # The run folder appears only once everything a user can get wrong has been checked.
        if self.world.main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(OmegaConf.to_yaml(self.cfg, resolve=True))

    def resume_from(self, path: Path) -> None:
        """Weights, optimizer, schedule, counters, data position and, last, the RNG states."""
        contents, record = checkpoint_mod.read_checkpoint(
            path, model=self.model, head=self.head, rank=self.world.rank
        )
        if record["data"] != self.data_identity():
            raise ModeError(
                f"cannot resume from {path}: the training data differ from the checkpoint's "
                f"({record['data']} there, {self.data_identity()} now)"
            )
        load_trainable_state(self.module, self.world, contents.adapter, contents.head)
        try:
            load_optimizer_state(self.module, self.optimizer, self.world, contents.optimizer)
            self.scheduler.load_state_dict(contents.scheduler)
        except ValueError as err:
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
        self.state = TrainerState.from_record(record)
        self.resumed_step = self.checkpointed_step = self.state.step
        self.last_checkpoint = path
        self.stream = self.new_stream(self.state.epoch, self.state.index)
        console.print(
            f"resuming from {path} (step {self.state.step}/{self.cfg.train.max_steps})",
            soft_wrap=True,
        )
        # Last: nothing may draw random numbers between here and the first resumed step.
        checkpoint_mod.set_rng_state(contents.rng)

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
            trained_adapter = method(self.cfg).trains_adapter
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
        """The merged model, by rank 0 alone once every rank is done with its training model (with
        a sharded model, on the CPU: the whole model may not fit one device)."""
        del self.wrapped, self.module, self.model, self.optimizer
        if self.on_cuda:
            torch.cuda.empty_cache()
        device = "cpu" if self.world.sharded else self.device
        return save_merged(self.cfg, self.source, self.out, device)

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
        candidates = self.find_checkpoint()
        if candidates is None and (self.out / "config.yaml").exists():
            raise ModeError(
                f"{self.out} already holds a run; pick another output_dir (nothing was changed), "
                "or continue it with resume=auto"
            )
        if self.out != checked:  # resume=PATH alone continues in the checkpoint's run folder
            self.check_output_folders()
        # Every rank has looked at the folder before rank 0 writes into it.
        self.world.barrier()
        console.print(f"[bold]mode train[/bold] {self.cfg.recipe} -> {self.out}")
        self.setup_data()
        self.choose_micro_batch()
        self.setup_model()
        self.confirm_micro_batch()
        if candidates is None:
            self.start_new_run()
        else:
            self.resume_from(self.intact_checkpoint(candidates))
        counts = self.trainable_parameters()
        processes = (
            f"; {self.world.size} processes ({self.world.strategy})"
            if self.world.distributed
            else ""
        )
        console.print(
            f"{len(self.train_set.examples)} train / {len(self.eval_set.examples)} eval examples; "
            f"trainable parameters: {counts['adapter']:,} adapter + {counts['mode_head']:,} "
            f"MoDE head; device {self.device}{processes}"
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
        if self.cfg.merge.enabled and method(self.cfg).trains_adapter:
            merged = self.merge()
            console.print(f"merged model ({self.cfg.merge.base} base): {merged}")
        elif self.cfg.merge.enabled:
            console.print(
                f"no merged model: loss={self.cfg.loss.name} trains no adapter, the base is "
                "unchanged"
            )
        console.print(f"[bold green]done[/bold green] in {self.out}")
        return self.out


def dry_run(cfg: DictConfig, memory: str | None = None) -> dict:
    """Compose, validate, tokenize the data; show one example, the counts and the memory plan
    (`fit.py`; `memory`: its budget, default this machine's). No weights loaded beyond the
    model's config (and a scaled-down random stand-in the plan measures), no training."""
    recipe = FinetuneRecipe(cfg)
    recipe.setup_data()
    facts = model_facts(cfg)
    counts = {"adapter": sum(facts.params.adapter), "mode_head": facts.params.head}
    counts["total"] = counts["adapter"] + counts["mode_head"]
    show_example(recipe.tokenizer, recipe.train_set.examples[0])
    for name, split in (("train", recipe.train_set), ("eval", recipe.eval_set)):
        console.print(f"{name}: {split.stats.describe(cfg.data.max_seq_len)}")
    console.print(
        f"trainable parameters: {counts['adapter']:,} adapter + {counts['mode_head']:,} MoDE head "
        f"= {counts['total']:,}"
    )
    plan, choice = plan_recipe(cfg, memory, facts=facts, data=data_bytes(recipe.train_set.examples))
    console.print(render_plan(plan, cfg.recipe, choice))
    console.print("[bold]dry run[/bold]: recipe valid, data ready; no training done")
    return {
        "train_examples": len(recipe.train_set.examples),
        "eval_examples": len(recipe.eval_set.examples),
        "train_tokens": recipe.train_set.stats.tokens,
        "trainable": counts,
        "memory": plan.to_dict(),
    }


def show_example(tokenizer, example: Example) -> None:
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
    console.print(f"[bold]example[/bold] (dim: prompt, masked; {legend}: response, trained):")
    console.print(text)
