"""Per-layer metrics of a model on an eval split: every layer read through the LM head (logit lens),
the MoDE ensemble, and the router's weights; the same for the base before tuning.

Loss, perplexity and next-token top-1 accuracy over the response tokens. Each layer's state goes
through a norm and the shared LM head: the trained MoDE norm for a selected layer, the final norm
elsewhere; the model's own logit processing (Gemma 2's soft-capping) applies to every layer.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from contextlib import nullcontext

import torch
from omegaconf import DictConfig

from mode_cli.data.batching import at_targets, collate, target_positions
from mode_cli.data.splits import Dataset
from mode_cli.mode.head import MoDEHead, has_ensemble
from mode_cli.mode.terms import head_logits
from mode_cli.models import families


class Tally:
    """Running sums of cross-entropy and top-1 hits over tokens."""

    def __init__(self) -> None:
        self.loss = 0.0
        self.correct = 0
        self.tokens = 0

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.loss += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        self.correct += int((logits.argmax(-1) == labels).sum())
        self.tokens += labels.numel()

    def result(self) -> dict[str, float]:
        loss = self.loss / max(1, self.tokens)
        return {
            "loss": loss,
            "perplexity": math.exp(min(loss, 700.0)),
            "top1": self.correct / max(1, self.tokens),
        }


@torch.no_grad()
def layer_metrics(
    model,
    head: MoDEHead | None,
    dataset: Dataset,
    tokenizer,
    device: str,
    batch_size: int,
    max_examples: int | None,
    only_layers: Collection[int] | None = None,
) -> dict:
    """Per-layer, ensemble and router statistics of one model (+ head) on a dataset.

    only_layers: read just these layers through the LM head (and the final one); the others'
    entries in `layers` are None. Eval during training asks only for the selected layers.
    """
    was_training = model.training
    model.eval()
    n = families.num_layers(model)
    lm_head = families.lm_head(model)
    final_norm = families.final_norm(model)
    logit_fn = families.logit_fn(model)

    def logits(states: torch.Tensor) -> torch.Tensor:
        # Every layer, and the ensemble, read through the head and its quirks (soft-capping).
        return head_logits(lm_head, states, logit_fn)

    layers = [Tally() for _ in range(n)]
    ensemble = Tally()
    routed = has_ensemble(head)
    selected = head.layers if routed else []
    router_sum = torch.zeros(len(selected), dtype=torch.float64)
    router_sq = torch.zeros(len(selected), dtype=torch.float64)
    wanted = set(range(1, n + 1)) if only_layers is None else {*only_layers, n}
    # The router reads the selected layers' states, whatever is reported.
    needed = sorted(wanted | set(selected))
    examples = dataset.examples[:max_examples] if max_examples else dataset.examples
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size], tokenizer.pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        # A head with its own norm for layer N reads N's state before the model's final norm.
        pre_norm = head is not None and head.train_final_norm
        states = families.hidden_states(
            model, batch["input_ids"], batch["attention_mask"], final_norm_input=pre_norm
        )
        keep, labels = target_positions(batch["labels"])
        kept = {layer: at_targets(states[layer], keep) for layer in needed}
        final = final_norm(kept[n]) if pre_norm else kept[n]  # what the model itself predicts from
        for layer in sorted(wanted - {n}):
            norm = (
                head.norms[str(layer)]
                if head is not None and str(layer) in head.norms
                else final_norm
            )
            layers[layer - 1].add(logits(norm(kept[layer])), labels)
        layers[n - 1].add(logits(final), labels)
        if routed:
            normed, weights = head(kept)
            ensemble.add(logits(MoDEHead.mix(normed, weights)), labels)
            router_sum += weights.double().sum(0).cpu()
            router_sq += (weights.double() ** 2).sum(0).cpu()
    model.train(was_training)
    tokens = layers[-1].tokens
    router = {}
    for i, layer in enumerate(selected):
        mean = router_sum[i].item() / max(1, tokens)
        var = max(0.0, router_sq[i].item() / max(1, tokens) - mean**2)
        router[layer] = {"mean": mean, "std": math.sqrt(var)}
    return {
        "layers": [t.result() if i + 1 in wanted else None for i, t in enumerate(layers)],
        "ensemble": ensemble.result() if routed else None,
        "router": router,
        "tokens": tokens,
        "examples": len(examples),
    }


def fresh_head(head: MoDEHead | None, model, device: str) -> MoDEHead | None:
    """A freshly initialised head shaped like `head`: what step 0 of training saw."""
    if head is None:
        return None
    return MoDEHead.from_description(families.final_norm(model), head.describe()).to(device)


def run_base_metrics(cfg: DictConfig, model, head, dataset, tokenizer, device: str) -> dict:
    """The base before tuning, from the run's own model: adapter off, an untrained head."""
    # A mode-only run has no adapter: its base is the model itself.
    adapter_off = model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()
    with adapter_off:
        return layer_metrics(
            model,
            fresh_head(head, model, device),
            dataset,
            tokenizer,
            device,
            cfg.eval.batch_size,
            cfg.eval.max_examples,
        )


def training_eval(model, head: MoDEHead | None, dataset: Dataset, tokenizer, device: str, eval_cfg):
    """What eval during training logs: the eval-split loss of the final layer, each selected
    layer and the ensemble, and the mean router weight per selected layer."""
    metrics = layer_metrics(
        model,
        head,
        dataset,
        tokenizer,
        device,
        eval_cfg.batch_size,
        eval_cfg.max_examples,
        only_layers=head.layers if head is not None else (),
    )
    n = len(metrics["layers"])
    selected = head.layers if head is not None else [n]
    ensemble = metrics["ensemble"]["loss"] if metrics["ensemble"] is not None else None
    return {
        "final": metrics["layers"][-1]["loss"],
        "layers": {str(layer): metrics["layers"][layer - 1]["loss"] for layer in selected},
        "ensemble": ensemble,
        "router": {str(layer): w["mean"] for layer, w in metrics["router"].items()},
        "examples": metrics["examples"],
        "tokens": metrics["tokens"],
    }
