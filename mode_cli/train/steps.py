"""One optimizer step's work: the micro-batches in their seeded order, the forward through the
decoder and the loss, and backward with the loss normalised by the step's target tokens.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, replace

import numpy as np
from torch import nn

from mode_cli.data.batching import (
    at_targets,
    collate,
    epoch_order,
    target_count,
    target_positions,
    trained_tokens,
)
from mode_cli.data.tokenizing import IGNORE
from mode_cli.mode.head import MoDEHead
from mode_cli.mode.loss import IMPLEMENTATIONS, final_only_loss
from mode_cli.mode.terms import LossSums, LossWeights
from mode_cli.models import families
from mode_cli.train.distributed import World, gradient_sync


def batch_loss(
    model, head: MoDEHead | None, batch: dict, weights: LossWeights, impl: str = "chunked"
) -> LossSums:
    """Summed loss of one micro-batch: decoder states, masked positions dropped, then the loss."""
    states = families.hidden_states(
        model,
        batch["input_ids"],
        batch["attention_mask"],
        batch.get("position_ids"),
        final_norm_input=head is not None and head.train_final_norm,
    )
    keep, labels = target_positions(batch["labels"])
    lm_head = families.lm_head(model)
    logit_fn = families.logit_fn(model)
    if head is None:
        return final_only_loss(at_targets(states[-1], keep), labels, lm_head, logit_fn, impl)
    normed, routing = head({layer: at_targets(states[layer], keep) for layer in head.layers})
    return IMPLEMENTATIONS[impl](normed, routing, labels, lm_head, weights, logit_fn=logit_fn)


class TrainingModule(nn.Module):
    """The model and its MoDE head as one module whose forward returns a micro-batch's loss sums.

    DDP and FSDP see gradients only of what runs inside their wrapper's forward: the decoder, the
    head and the loss all run here.
    """

    def __init__(self, model: nn.Module, head: MoDEHead | None) -> None:
        super().__init__()
        self.model = model
        self.head = head

    def forward(self, batch: dict, weights: LossWeights, impl: str = "chunked") -> LossSums:
        return batch_loss(self.model, self.head, batch, weights, impl)


@dataclass
class StepLoss:
    """One optimizer step's loss, each term, and its token counts."""

    loss: float  # summed over the step's micro-batches, divided by its target tokens
    parts: dict[str, float]  # each loss term, normalised the same way
    target_tokens: int
    tokens: int  # attended tokens of the examples trained on, for tokens/s


def accumulate_gradients(
    module: nn.Module,
    micro: list[dict],
    weights: LossWeights,
    impl: str = "chunked",
    autocast=nullcontext,
    world: World | None = None,
) -> StepLoss:
    """Forward and backward over the micro-batches of one optimizer step.

    `module` is the training module (`distributed.TrainingModule`, or its DDP / FSDP wrapper):
    called on a batch, it returns the batch's loss sums. Each micro-batch's summed loss is divided
    by the target tokens of the whole step on every rank together (not of the micro-batch, nor of
    the rank), so the gradients add up to those of one batch holding every example, however the
    step is split into micro-batches and processes. The wrappers average gradients over ranks,
    hence the factor of the world size.
    """
    world = world or World()
    local = [target_count(b) for b in micro]
    step_tokens = int(world.sum([sum(local)])[0])
    total, parts, tokens = 0.0, {}, 0
    for i, batch in enumerate(micro):
        with gradient_sync(module, world, sync=i == len(micro) - 1), autocast():
            sums = module(batch, weights, impl)
            (sums.total * (world.size / step_tokens)).backward()
        total += sums.total.item()
        for key, value in sums.parts.items():
            parts[key] = parts.get(key, 0.0) + value
        tokens += trained_tokens(batch)
    keys = sorted(parts)
    total, tokens, *values = world.sum([total, tokens, *(parts[key] for key in keys)])
    return StepLoss(
        loss=total / step_tokens,
        parts={key: value / step_tokens for key, value in zip(keys, values, strict=True)},
        target_tokens=step_tokens,
        tokens=int(tokens),
    )


class BatchStream:
    """Collated micro-batches, epoch after epoch, in the order fixed by the seed.

    `position` (epoch, index of the next micro-batch in that epoch) is all a checkpoint needs to
    restart the stream exactly where it was: each epoch's order is a pure function of the seed.

    With several processes, `shard` = (rank, world size): the stream walks global micro-batches of
    `batch_size` x world size examples, and this rank reads every world-size-th example of each
    (its shard), so the ranks together see what one process with the global micro-batch would.
    """

    def __init__(
        self,
        examples,
        batch_size: int,
        seed: int,
        pad_id: int,
        epoch: int = 0,
        index: int = 0,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        self.examples, self.pad_id, self.seed = examples, pad_id, seed
        self.rank, self.world_size = shard
        self.batch_size = batch_size * self.world_size  # the global micro-batch
        self.epoch, self.index = epoch, index
        self._order_epoch, self._order = -1, None
        self.batches_per_epoch = -(-len(examples) // self.batch_size)

    def epoch_order(self) -> np.ndarray:
        """The order of this epoch's examples (kept while the epoch lasts)."""
        if self._order_epoch != self.epoch:
            self._order = epoch_order(len(self.examples), self.seed, self.epoch)
            self._order_epoch = self.epoch
        return self._order

    def next(self) -> dict:
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        start = self.index * self.batch_size
        batch = self.epoch_order()[start : start + self.batch_size]
        self.index += 1
        # Only this rank's examples are read (from memory-mapped tokens, for a large split).
        mine = [self.examples[int(i)] for i in batch[self.rank :: self.world_size]]
        if not mine:
            # An epoch's last global micro-batch can hold fewer examples than there are ranks.
            # This rank still runs the step (its wrapper synchronises gradients) on an example
            # with nothing trained: it adds no loss, no gradient and no tokens to tokens/s.
            first = self.examples[int(batch[0])]
            mine = [replace(first, labels=[IGNORE] * len(first.labels))]
        return collate(mine, self.pad_id)

    @property
    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    @property
    def epochs_done(self) -> float:
        return self.epoch + self.index / max(1, self.batches_per_epoch)
