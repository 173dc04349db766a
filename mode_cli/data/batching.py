"""From examples to batches: packing short examples into full sequences, collating micro-batches,
the seeded order of each epoch, and the shift that pairs each position with the token it predicts.
"""

from __future__ import annotations

import random

import torch

from mode_cli.data.tokenizing import IGNORE, Example


def pack(examples: list[Example], max_seq_len: int, seed: int) -> list[Example]:
    """Pack examples greedily, in a seeded order, into sequences of at most `max_seq_len`.

    Each packed sequence's `position_ids` restart at 0 at every example, which the decoder turns
    into a block-diagonal causal mask (no attention across examples), and the first label of every
    example is masked, so no example is trained to predict the start of the next one.
    """
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    packed: list[Example] = []
    current: list[Example] = []
    length = 0
    for i in order:
        example = examples[i]
        if current and length + len(example.input_ids) > max_seq_len:
            packed.append(join(current))
            current, length = [], 0
        current.append(example)
        length += len(example.input_ids)
    if current:
        packed.append(join(current))
    return packed


def join(examples: list[Example]) -> Example:
    """One packed sequence from examples placed one after another."""
    input_ids, labels, position_ids = [], [], []
    for example in examples:
        input_ids += example.input_ids
        labels += [IGNORE, *example.labels[1:]]
        position_ids += range(len(example.input_ids))
    return Example(input_ids, labels, position_ids)


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch; padded positions are masked in attention and labels.

    Packed sequences add `position_ids`; their padding gets positions of its own (0, 1, ...), so
    it is a separate block the real tokens never attend to, and the model is run with these
    position ids instead of the attention mask (`model.hidden_states`).
    """
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    packed = any(e.position_ids is not None for e in examples)
    position_ids = torch.zeros((len(examples), width), dtype=torch.long)
    for i, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[i, :n] = torch.tensor(example.input_ids)
        labels[i, :n] = torch.tensor(example.labels)
        attention_mask[i, :n] = 1
        if packed:
            own = example.position_ids if example.position_ids is not None else range(n)
            position_ids[i, :n] = torch.tensor(list(own))
            position_ids[i, n:] = torch.arange(width - n)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if packed:
        batch["position_ids"] = position_ids
    return batch


def batches(examples: list[Example], batch_size: int, seed: int, epoch: int) -> list[list[Example]]:
    """Shuffled micro-batches for one epoch; the order depends only on (seed, epoch)."""
    order = list(range(len(examples)))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    return [
        [examples[i] for i in order[start : start + batch_size]]
        for start in range(0, len(order), batch_size)
    ]


def target_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Which positions predict a trained token, and those tokens: `(keep [B, T-1], targets [K])`.

    Position t predicts token t + 1, so the last position predicts nothing and the first token is
    never a target; a target is trained unless its label is IGNORE (prompt, padding).
    """
    targets = labels[:, 1:]
    keep = targets != IGNORE
    return keep, targets[keep]


def at_targets(states: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The `[K, H]` states of the positions `target_positions` keeps, from `[B, T, H]` states."""
    return states[:, :-1][keep]


def trained_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Attended tokens of the rows that train something: what tokens/s counts.

    Every example has a target (one without is dropped as the data load), so only the stand-in
    row a rank runs when an epoch's last global micro-batch leaves it no example
    (`steps.BatchStream`) is left out: N processes count the tokens one process does.
    """
    trains = target_positions(batch["labels"])[0].any(dim=1)
    return int(batch["attention_mask"][trains].sum())


def target_count(batch: dict[str, torch.Tensor]) -> int:
    """Number of predicted (unmasked) target tokens in a batch, after the one-token shift."""
    return int(target_positions(batch["labels"])[0].sum())
