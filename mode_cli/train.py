"""`mode train`: QLoRA + MoDE finetuning in plain PyTorch, readable top to bottom.

setup (seed, tokenizer, data, 4-bit base, LoRA, MoDE head, optimizer, schedule) -> train (the
loop) -> save (adapter, head, metrics) -> report (per-layer eval) -> merge (plain transformers
model). Every knob is in `config.py`; the trade-offs that matter most:

- train.micro_batch_size x train.grad_accum_steps is the optimizer batch. Memory follows the
  micro-batch; the loss is normalised by the target tokens of the whole optimizer step.
- train.gradient_checkpointing recomputes decoder activations in backward: less memory, ~30% slower.
- train.precision=bf16 (GPU) halves activation memory; fp32 is exact and is what the CPU runs.
- train.head_lr gives the MoDE head its own learning rate (norms and router move slowly at the
  adapter's rate).
"""

from __future__ import annotations

import json
import math
import random
import time
from contextlib import nullcontext
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from mode_cli import data as data_mod
from mode_cli import head as head_mod
from mode_cli import model as model_mod
from mode_cli.config import resolve_device, trains_adapter, validate
from mode_cli.data import IGNORE
from mode_cli.errors import ModeError
from mode_cli.head import MoDEHead
from mode_cli.loss import IMPLEMENTATIONS, LossSums, LossWeights, final_only_loss
from mode_cli.progress import TrainingProgress
from mode_cli.weighting import loss_weights

console = Console(stderr=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def default_output_dir(recipe: str) -> Path:
    return Path("outputs") / Path(recipe).stem / datetime.now().strftime("%Y%m%d-%H%M%S")


def selected_layers(cfg: DictConfig, num_layers: int) -> list[int]:
    """The layers of the MoDE ensemble, checked against the loaded model's depth."""
    layers = cfg.layers
    try:
        if layers.indices is not None:
            return head_mod.explicit(num_layers, layers.indices)
        if layers.select == "every_n":
            return head_mod.every_n(num_layers, layers.every, layers.of_last)
        if layers.select == "fraction":
            return head_mod.fraction_of_depth(num_layers, layers.fraction)
        return head_mod.last_k(num_layers, layers.k)
    except ValueError as err:
        raise ModeError(f"layers.{err}") from None


def build_head(cfg: DictConfig, model, device: str) -> MoDEHead | None:
    """The MoDE head for this recipe, or None for the final-only baseline."""
    if cfg.loss.name == "final-only":
        return None
    n = model_mod.num_layers(model)
    layers = selected_layers(cfg, n)
    router = cfg.router
    try:
        head = MoDEHead(
            final_norm=model_mod.final_norm(model),
            layers=layers,
            num_layers=n,
            hidden_size=model_mod.base_of(model).config.hidden_size,
            # layerwise trains per-layer exits: norms, no ensemble, so no router.
            router="none" if cfg.loss.name == "layerwise" else router.kind,
            init_final_weight=router.init_final_weight if router.init == "final" else None,
            fixed_weights=router.weights,
            router_input=router.input,
            detach_input=router.detach_input,
        )
    except ValueError as err:
        raise ModeError(f"router: {err}") from None
    return head.to(device)


def batch_loss(
    model, head: MoDEHead | None, batch: dict, weights: LossWeights, impl: str = "chunked"
) -> LossSums:
    """Summed loss of one micro-batch: decoder states, masked positions dropped, then the loss."""
    states = model_mod.hidden_states(model, batch["input_ids"], batch["attention_mask"])
    # Position t predicts token t+1; keep only positions whose target is trained.
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    labels = targets[keep]
    lm_head = model_mod.lm_head(model)
    logit_fn = model_mod.logit_fn(model)
    if head is None:
        return final_only_loss(states[-1][:, :-1][keep], labels, lm_head, logit_fn, impl)
    normed, routing = head({layer: states[layer][:, :-1][keep] for layer in head.layers})
    return IMPLEMENTATIONS[impl](normed, routing, labels, lm_head, weights, logit_fn=logit_fn)


def lr_lambda(warmup: int, total: int, min_ratio: float):
    """Linear warmup to the peak, then cosine decay to `min_ratio` of it at the last step."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def make_optimizer(cfg: DictConfig, model, head: MoDEHead | None) -> torch.optim.Optimizer:
    """AdamW over the adapter and the MoDE head, each with its own learning rate."""
    groups = [
        {
            "params": [p for p in model.parameters() if p.requires_grad],
            "lr": cfg.train.lr,
            "weight_decay": cfg.train.weight_decay,
        }
    ]
    if head is not None:
        groups.append(
            {
                "params": list(head.parameters()),
                "lr": cfg.train.head_lr or cfg.train.lr,
                "weight_decay": 0.0,
            }
        )
    groups = [group for group in groups if group["params"]]  # mode-only has no adapter
    if cfg.train.optimizer == "adamw":
        return torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8)
    import bitsandbytes as bnb

    optimizer_class = {
        "adamw_8bit": bnb.optim.AdamW8bit,
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
    }[cfg.train.optimizer]
    return optimizer_class(groups, betas=(0.9, 0.999), eps=1e-8)


class FinetuneRecipe:
    """One `mode train` run; `run()` goes setup -> train -> save -> report -> merge."""

    def __init__(self, cfg: DictConfig) -> None:
        validate(cfg)
        self.cfg = cfg
        self.device = resolve_device(cfg.train.device)
        self.out = Path(cfg.output_dir or default_output_dir(cfg.recipe or "run"))

    # ------------------------------------------------------------------ setup

    def setup_data(self) -> None:
        """Tokenizer and both splits: all `--dry-run` needs, no model weights."""
        cfg = self.cfg
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        seed_everything(cfg.train.seed)
        self.source = model_mod.resolve_source(cfg.model)
        self.tokenizer = model_mod.load_tokenizer(self.source, cfg.model)
        self.train_set, self.eval_set = data_mod.load_splits(cfg.data, self.tokenizer)

    def setup_model(self) -> None:
        cfg = self.cfg
        seed_everything(cfg.train.seed)
        base = model_mod.load_base_model(self.source, cfg.model, cfg.train.precision, self.device)
        if not trains_adapter(cfg):
            # The MoDE head trains alone on the frozen base: no adapter.
            if cfg.train.gradient_checkpointing:
                base.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False}
                )
            self.model = base
        else:
            self.model = model_mod.attach_lora(base, cfg.lora, cfg.train.gradient_checkpointing)
        self.head = build_head(cfg, self.model, self.device)
        self.optimizer = make_optimizer(cfg, self.model, self.head)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lr_lambda(cfg.train.warmup_steps, cfg.train.max_steps, cfg.train.min_lr_ratio),
        )

    def trainable_parameters(self) -> dict[str, int]:
        adapter = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        head = sum(p.numel() for p in self.head.parameters()) if self.head else 0
        return {"adapter": adapter, "mode_head": head, "total": adapter + head}

    # ------------------------------------------------------------------ train

    def micro_batches(self):
        """Endless micro-batches, epoch after epoch, in an order fixed by the seed."""
        epoch = 0
        while True:
            for examples in data_mod.batches(
                self.train_set.examples, self.cfg.train.micro_batch_size, self.cfg.train.seed, epoch
            ):
                yield data_mod.collate(examples, self.tokenizer.pad_token_id)
            epoch += 1

    def step_weights(self, step: int) -> LossWeights:
        """The loss terms' weights at this step (a layerwise curriculum changes them)."""
        layers = self.head.layers if self.head is not None else []
        return loss_weights(self.cfg.loss, layers, step, self.cfg.train.max_steps)

    def to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device) for k, v in batch.items()}

    def autocast(self):
        if self.cfg.train.precision == "bf16":
            return torch.autocast(device_type=self.device, dtype=torch.bfloat16)
        return nullcontext()

    def train(self) -> None:
        cfg = self.cfg.train
        self.model.train()  # from_pretrained returns eval mode; dropout and bnb need train mode
        trainable = [p for group in self.optimizer.param_groups for p in group["params"]]
        batches = self.micro_batches()
        start = time.perf_counter()
        seen_tokens = 0
        with (
            (self.out / "metrics.jsonl").open("a") as metrics_file,
            TrainingProgress(cfg.max_steps, console, cfg.log_every) as progress,
        ):
            for step in range(1, cfg.max_steps + 1):
                micro = [self.to_device(next(batches)) for _ in range(cfg.grad_accum_steps)]
                weights = self.step_weights(step)
                # Normalise by the target tokens of the whole step, not per micro-batch.
                step_tokens = sum(data_mod.target_count(b) for b in micro)
                total, parts = 0.0, {}
                for batch in micro:
                    with self.autocast():
                        sums = batch_loss(self.model, self.head, batch, weights, self.cfg.loss.impl)
                    (sums.total / step_tokens).backward()
                    total += sums.total.item()
                    for key, value in sums.parts.items():
                        parts[key] = parts.get(key, 0.0) + value
                    seen_tokens += int(batch["attention_mask"].sum())
                loss = total / step_tokens
                if not math.isfinite(loss):
                    raise ModeError(
                        f"Loss became {loss} at step {step}: lower train.lr or check the data"
                    )
                grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm or 1e9)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                lr = self.scheduler.get_last_lr()[0]
                self.scheduler.step()

                elapsed = time.perf_counter() - start
                record = {
                    "step": step,
                    "loss": loss,
                    **{k: v / step_tokens for k, v in parts.items()},
                    "lr": lr,
                    "grad_norm": float(grad_norm),
                    "target_tokens": step_tokens,
                    "tokens_per_s": seen_tokens / elapsed,
                    "elapsed_s": elapsed,
                }
                if step % cfg.log_every == 0 or step == cfg.max_steps:
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
                progress.update(step, loss=loss, lr=lr, tokens_per_s=record["tokens_per_s"])

    # ------------------------------------------------------------------ outputs

    def save(self) -> None:
        """The adapter (peft format, with the tokenizer) and the MoDE head (safetensors + json)."""
        from mode_cli.artifacts import save_head

        if trains_adapter(self.cfg):
            self.model.save_pretrained(self.out / "adapter")
            self.tokenizer.save_pretrained(self.out / "adapter")
        if self.head is not None:
            save_head(self.head, self.out)

    def report(self) -> dict:
        from mode_cli.report import evaluate, print_report, write_report

        report = evaluate(
            self.cfg, self.model, self.head, self.eval_set, self.tokenizer, self.device
        )
        write_report(report, self.out)
        print_report(report, console)
        return report

    def merge(self) -> Path:
        from mode_cli.artifacts import save_merged

        # Free the training model first: the merge reloads and dequantizes the base.
        del self.model, self.optimizer
        if self.device == "cuda":
            torch.cuda.empty_cache()
        return save_merged(self.cfg, self.source, self.out, self.device)

    def run(self) -> Path:
        if (self.out / "config.yaml").exists():
            raise ModeError(
                f"{self.out} already holds a run; pick another output_dir (nothing was changed)"
            )
        console.print(f"[bold]mode train[/bold] {self.cfg.recipe} -> {self.out}")
        self.setup_data()
        self.setup_model()
        # The run folder appears only once everything a user can get wrong has been checked.
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.yaml").write_text(OmegaConf.to_yaml(self.cfg, resolve=True))
        counts = self.trainable_parameters()
        console.print(
            f"{len(self.train_set.examples)} train / {len(self.eval_set.examples)} eval examples; "
            f"trainable parameters: {counts['adapter']:,} adapter + {counts['mode_head']:,} "
            f"MoDE head; device {self.device}"
        )
        self.train()
        self.save()
        self.report()
        if self.cfg.merge and trains_adapter(self.cfg):
            merged = self.merge()
            console.print(f"merged model: {merged}")
        elif self.cfg.merge:
            console.print(
                "no merged model: loss=mode-only trains no adapter, the base is unchanged"
            )
        console.print(f"[bold green]done[/bold green] in {self.out}")
        return self.out


def dry_run(cfg: DictConfig) -> dict:
    """Compose, validate, tokenize the data; show one example and the counts. No weights loaded
    beyond the model's config, no training."""
    recipe = FinetuneRecipe(cfg)
    recipe.setup_data()
    seed_everything(cfg.train.seed)
    counts = count_trainable(recipe)
    show_example(recipe.tokenizer, recipe.train_set.examples[0])
    for name, split in (("train", recipe.train_set), ("eval", recipe.eval_set)):
        stats = split.stats
        console.print(
            f"{name}: {len(split.examples):,} examples from {stats.rows:,} rows, "
            f"{stats.tokens:,} tokens ({stats.trained_tokens:,} trained); "
            f"{stats.truncated} truncated at data.max_seq_len={cfg.data.max_seq_len}, "
            f"{stats.dropped_empty} dropped with no response left, {len(stats.skipped)} bad rows skipped"
        )
    console.print(
        f"trainable parameters: {counts['adapter']:,} adapter + {counts['mode_head']:,} MoDE head "
        f"= {counts['total']:,}"
    )
    console.print("[bold]dry run[/bold]: recipe valid, data ready; no training done")
    return {
        "train_examples": len(recipe.train_set.examples),
        "eval_examples": len(recipe.eval_set.examples),
        "train_tokens": recipe.train_set.stats.tokens,
        "trainable": counts,
    }


def show_example(tokenizer, example: data_mod.Example) -> None:
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


def count_trainable(recipe: FinetuneRecipe) -> dict[str, int]:
    """Trainable parameters, counted on a weightless copy of the model (meta device)."""
    from accelerate import init_empty_weights
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = recipe.cfg
    config = AutoConfig.from_pretrained(
        recipe.source, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code
    )
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    model_mod.family_of(skeleton)
    targets = model_mod.lora_targets(skeleton, cfg.lora.target_modules)
    adapter = 0
    if trains_adapter(cfg):
        skeleton = get_peft_model(skeleton, model_mod.peft_lora_config(cfg.lora, targets))
        adapter = sum(p.numel() for p in skeleton.parameters() if p.requires_grad)
    head = 0
    if cfg.loss.name != "final-only":
        with init_empty_weights():
            head = sum(p.numel() for p in build_head(cfg, skeleton, "meta").parameters())
    return {"adapter": adapter, "mode_head": head, "total": adapter + head}
