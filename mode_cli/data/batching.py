"""From examples to batches: packing short examples into full sequences, collating micro-batches,
the seeded order of each epoch, and the shift that pairs each position with the token it predicts.
"""

from __future__ import annotations

import random
from array import array

import numpy as np
import torch

from mode_cli.data.tokenizing import IGNORE, Example


def shuffled(n: int, rng: random.Random) -> np.ndarray:
    """`range(n)` shuffled by `rng` (the permutation `rng.shuffle` gives any list of n items), as
    int64 without a Python object per item."""
    order = array("q", range(n))
    rng.shuffle(order)
    return np.frombuffer(order, dtype=np.int64)


def pack_groups(lengths: np.ndarray, max_seq_len: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Pack examples of these lengths greedily, in a seeded order, into sequences of at most
    `max_seq_len` tokens: `(members, starts)`, sequence g holding the examples
    `members[starts[g]:starts[g + 1]]` in that order (`join` makes it one example).

    Each packed sequence's `position_ids` restart at 0 at every example, which the decoder turns
    into a block-diagonal causal mask (no attention across examples), and the first label of every
    example is masked, so no example is trained to predict the start of the next one.
    """
    members = shuffled(len(lengths), random.Random(seed))
    starts = [0]
    length = 0
    for position, i in enumerate(members.tolist()):
        n = int(lengths[i])
        if position > starts[-1] and length + n > max_seq_len:
            starts.append(position)
            length = 0
        length += n
    if len(members):
        starts.append(len(members))
    return members, np.asarray(starts, dtype=np.int64)


def pack(examples: list[Example], max_seq_len: int, seed: int) -> list[Example]:
    """A list of examples packed as `pack_groups` packs them, each sequence joined."""
    members, starts = pack_groups(
        np.asarray([len(e.input_ids) for e in examples]), max_seq_len, seed
    )
    return [
        join([examples[i] for i in members[a:b]])
        for a, b in zip(starts[:-1], starts[1:], strict=True)
    ]


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


def epoch_order(count: int, seed: int, epoch: int) -> np.ndarray:
    """The order of the examples in one epoch, a pure function of (seed, epoch); micro-batch i
    is `order[i * batch_size : (i + 1) * batch_size]`."""
    return shuffled(count, random.Random(seed * 100_003 + epoch))


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
