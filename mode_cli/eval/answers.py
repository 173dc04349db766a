"""Answer accuracy: greedy generations decoded with the ensemble and with the final head of the
tuned model, and with the base model before tuning, scored by exact match against a dataset's
reference answers; each rate with its 95% Wilson interval (`stats.py`).

On the CPU a 4-bit model decodes from a dequantized fp32 copy (the base dequantized, the adapter
merged in: the weights the adapter was trained against), since bitsandbytes' 4-bit kernels are
many times slower there than fp32 matmuls. That is what makes answer accuracy affordable at the
end of training for small models (`eval.answers_auto_max_params`).

The comparison is made after a normalisation (`eval.answer_match`):

- `number`: the number a text gives as its answer: the one after "The answer is" or "####" (the
  bundled arithmetic data and GSM8K write their answers that way), else the last number in the
  text; thousands separators are dropped and `42.0` equals `42`.
- `exact`: the whole text, with case, surrounding whitespace, runs of whitespace and a final
  period ignored.
- `choice`: a multiple-choice letter (A-J): the one after "answer is", else the first standalone
  capital letter in that range.

A normalisation that finds nothing (no number in a generation, say) never matches.
"""

from __future__ import annotations

import gc
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

from mode_cli.data.formats import row_format, row_prompt
from mode_cli.data.splits import eval_rows
from mode_cli.decode.generate import generate_texts, run_stop_ids
from mode_cli.devices import is_cuda
from mode_cli.errors import ModeError
from mode_cli.eval.report import data_description
from mode_cli.eval.stats import CONFIDENCE, wilson_interval
from mode_cli.mode.head import has_ensemble
from mode_cli.models import families
from mode_cli.models.merging import dequantized_base, merge_into

# `eval.answers`: `auto` scores answers when the eval rows have them (at the end of training only for
# a base of at most `eval.answers_auto_max_params` parameters); `on` always (and requires them); `off`.
ANSWER_MODES = ("auto", "on", "off")

_NUMBER = r"-?\d[\d,]*(?:\.\d+)?"
_MARKED_NUMBER = re.compile(r"(?:answer is|####)\s*\$?\s*(" + _NUMBER + r")", re.IGNORECASE)
_ANY_NUMBER = re.compile(_NUMBER)
_MARKED_CHOICE = re.compile(r"answer is\s*\(?([A-J])\b")
_ANY_CHOICE = re.compile(r"(?<![A-Za-z])\(?([A-J])\)?(?![A-Za-z])")

# The kinds of (ensemble, final) outcome, in the order reports list them.
OUTCOMES = ("both_right", "ensemble_only", "final_only", "both_wrong")
DISAGREEMENTS = ("ensemble_only", "final_only")
OUTCOME_OF = {
    (True, True): "both_right",
    (True, False): "ensemble_only",
    (False, True): "final_only",
    (False, False): "both_wrong",
}


def canonical_number(text: str) -> str:
    """`1,234.50` -> `1234.5`, `42.0` -> `42`, `-7` -> `-7`."""
    text = text.replace(",", "")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    if text in ("-0", ""):
        text = "0"
    return text


def number_answer(text: str) -> str | None:
    """The number a text gives as its answer (see the module docstring), canonical; else None."""
    marked = _MARKED_NUMBER.search(text)
    if marked:
        return canonical_number(marked.group(1))
    numbers = _ANY_NUMBER.findall(text)
    return canonical_number(numbers[-1]) if numbers else None


def exact_answer(text: str) -> str | None:
    """The text with case, runs of whitespace and a final period ignored; None when empty."""
    text = " ".join(text.split()).casefold().rstrip(".").strip()
    return text or None


def choice_answer(text: str) -> str | None:
    """A multiple-choice letter A-J: after "answer is", else the first standalone one."""
    marked = _MARKED_CHOICE.search(text)
    if marked:
        return marked.group(1)
    first = _ANY_CHOICE.search(text)
    return first.group(1) if first else None


NORMALISERS: dict[str, Callable[[str], str | None]] = {
    "number": number_answer,
    "exact": exact_answer,
    "choice": choice_answer,
}


def is_correct(generated: str, reference: str, match: str) -> bool:
    """Whether a generation gives the reference answer under the normalisation `match`."""
    normalise = NORMALISERS[match]
    want = normalise(str(reference))
    return want is not None and normalise(generated) == want


def has_answers(rows: Sequence[dict], field: str) -> bool:
    """Whether every row carries a non-empty reference answer in `field`."""
    return bool(rows) and all(
        isinstance(row, dict) and str(row.get(field) or "").strip() for row in rows
    )


def check_answers_available(rows: Sequence[dict], field: str, source: str) -> None:
    """`eval.answers=on` on data without reference answers: one clear message."""
    if has_answers(rows, field):
        return
    missing = next(
        (i for i, row in enumerate(rows, 1) if not str(row.get(field) or "").strip()), None
    )
    where = f" (row {missing} has none)" if missing else " (no eval rows)"
    raise ModeError(
        f"Answer accuracy needs reference answers, and the eval rows of {source} have no "
        f"'{field}' field{where}. Name the field with eval.answer_field=NAME, or turn answer "
        "accuracy off with eval.answers=off"
    )


def rate(hits: Sequence[bool]) -> dict:
    """`{correct, accuracy, interval}` of a list of right/wrong answers; the interval is the 95%
    Wilson score interval of the rate, `[low, high]` (null without examples)."""
    n = len(hits)
    correct = sum(hits)
    interval = wilson_interval(correct, n)
    return {
        "correct": correct,
        "accuracy": correct / n if n else 0.0,
        "interval": list(interval) if interval else None,
    }


def score(
    references: Sequence[str],
    prompts: Sequence[str],
    outputs: dict[str, Sequence[str]],
    match: str,
    examples_per_kind: int = 3,
    base: Sequence[str] | None = None,
) -> dict:
    """Accuracy per head, the (ensemble, final) agreement counts and a few disagreements.

    `outputs` maps a head (`ensemble`, `final`) to its generations, one per reference; `base`,
    when given, holds the base model's generations (before tuning, final head). Each rate comes
    with its 95% Wilson interval. With both heads, `agreement` counts both right / ensemble only /
    final only / both wrong, and `disagreements` holds up to `examples_per_kind` examples of each
    one-sided kind.
    """
    n = len(references)

    def hits(texts: Sequence[str]) -> list[bool]:
        return [is_correct(text, ref, match) for text, ref in zip(texts, references, strict=True)]

    correct = {head: hits(texts) for head, texts in outputs.items()}
    result: dict = {
        "examples": n,
        "confidence": CONFIDENCE,
        "interval": "wilson",
        "heads": {head: rate(right) for head, right in correct.items()},
        "base": None if base is None else {"final": rate(hits(base))},
        "agreement": None,
        "disagreements": None,
    }
    if "ensemble" in correct and "final" in correct:
        agreement = dict.fromkeys(OUTCOMES, 0)
        disagreements: dict[str, list[dict]] = {kind: [] for kind in DISAGREEMENTS}
        for i, (ens, fin) in enumerate(zip(correct["ensemble"], correct["final"], strict=True)):
            kind = OUTCOME_OF[(ens, fin)]
            agreement[kind] += 1
            if kind in disagreements and len(disagreements[kind]) < examples_per_kind:
                disagreements[kind].append(
                    {
                        "index": i,
                        "prompt": prompts[i],
                        "reference": str(references[i]),
                        "ensemble": outputs["ensemble"][i],
                        "final": outputs["final"][i],
                    }
                )
        result["agreement"] = agreement
        result["disagreements"] = disagreements
    return result


def answer_rows(cfg, *, auto: bool = True) -> list[dict] | None:
    """The eval rows answer accuracy scores (`eval.answer_examples` of them), or None when it is
    off. Read before any model is loaded, so `eval.answers=on` on data without answers fails fast.

    `auto=False` treats `eval.answers=auto` as off: the end-of-training report generates by
    default only for small models (`answers_by_default`).
    """
    if cfg.eval.answers == "off" or (cfg.eval.answers == "auto" and not auto):
        return None
    rows = eval_rows(cfg.data, limit=cfg.eval.answer_examples)
    field = cfg.eval.answer_field
    if cfg.eval.answers == "auto" and not has_answers(rows, field):
        return None
    check_answers_available(rows, field, data_description(cfg.data))
    return rows


def base_parameters(model) -> int:
    """The base model's parameter count: a 4-bit weight counts as its unpacked size, and the
    weights of an adapter (peft's `lora_*`, injected into the base) do not count."""
    base = families.base_of(model)
    adapter = sum(p.numel() for name, p in base.named_parameters() if "lora_" in name)
    return base.num_parameters() - adapter


def answers_by_default(cfg, model) -> bool:
    """Whether `eval.answers=auto` scores answers at the end of training: for a base of at most
    `eval.answers_auto_max_params` parameters, where decoding a dequantized copy takes minutes."""
    return base_parameters(model) <= cfg.eval.answers_auto_max_params


def decodes_dequantized(model, device: str) -> bool:
    """Whether answers decode from a dequantized fp32 copy: a 4-bit model on the CPU, where
    bitsandbytes' 4-bit kernels are many times slower than plain fp32 matmuls."""
    return not is_cuda(device) and quantized_4bit(model)


def quantized_4bit(model) -> bool:
    """Whether any layer of the model is a bitsandbytes 4-bit layer."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return False
    return any(isinstance(module, Linear4bit) for module in model.modules())


def decoding_sides(
    cfg, model, device: str, sides: Sequence[str], *, source: str | None, adapter: Path | None
) -> Iterator[tuple[str, object]]:
    """Each side of `sides`, in order, with the model it decodes from: "base" (the base before
    tuning: adapter off) and then "tuned" (adapter on). A side's model is valid until the next
    side is drawn.

    On the CPU a 4-bit model is replaced by a dequantized copy, built once: the base reloaded from
    `source` in 4 bits and dequantized; for the tuned side the adapter saved in `adapter` is merged
    into that copy, giving the weights the adapter was trained against, as
    `merge.base=dequantized` saves them. Elsewhere the model itself, its adapter switched off for
    the base side.
    """
    if list(sides) != [side for side in ("base", "tuned") if side in sides]:
        raise ValueError(f"sides decode base before tuned, each once: {list(sides)}")
    if not decodes_dequantized(model, device):
        for side in sides:
            if side == "tuned" or not hasattr(model, "disable_adapter"):
                yield side, model
            else:
                with model.disable_adapter():
                    yield side, model
        return
    if source is None:
        raise ValueError("decoding a 4-bit model on the CPU needs its source to dequantize")
    copy = dequantized_base(cfg, source, device)
    try:
        for side in sides:
            if side == "tuned" and adapter is not None:
                copy = merge_into(copy, adapter)
            yield side, copy
    finally:
        del copy
        gc.collect()


@contextmanager
def decoding_model(
    cfg, model, device: str, *, source: str | None, adapter: Path | None, tuned: bool = True
) -> Iterator:
    """The model one side's answers decode from: tuned (adapter on) or the base (adapter off);
    see `decoding_sides`."""
    with closing(
        decoding_sides(
            cfg, model, device, ["tuned" if tuned else "base"], source=source, adapter=adapter
        )
    ) as sides:
        yield next(sides)[1]


@dataclass(frozen=True)
class Prompts:
    """The answer rows' prompts, rendered, and the format each was rendered in: it decides how the
    prompt is tokenized, as training tokenized it (`tokenizing.prompt_ids`)."""

    texts: list[str]
    formats: list[str]


def answer_prompts(cfg, rows: Sequence[dict], tokenizer) -> Prompts:
    """The prompts of the answer rows, in the run's prompt format."""
    return Prompts(
        [row_prompt(row, cfg.data, tokenizer) for row in rows],
        [row_format(row, cfg.data) for row in rows],
    )


def decode_answers(
    cfg, model, head, tokenizer, device: str, prompts: Prompts, kinds: Sequence[str]
) -> dict[str, list[str]]:
    """Greedy generations of `model` (what `decoding_model` gives) per head kind."""
    stops = run_stop_ids(cfg.data, tokenizer)
    return {
        kind: generate_texts(
            model,
            head,
            tokenizer,
            prompts.texts,
            formats=prompts.formats,
            head_kind=kind,
            max_new_tokens=cfg.eval.max_new_tokens,
            device=device,
            batch_size=cfg.eval.answer_batch_size,
            stops=stops,
        )
        for kind in kinds
    }


def base_answers(
    cfg, model, tokenizer, device: str, prompts: Prompts, *, source: str | None, adapter=None
) -> list[str]:
    """The base model's answers before tuning: adapter off, final head."""
    with decoding_model(cfg, model, device, source=source, adapter=adapter, tuned=False) as base:
        return decode_answers(cfg, base, None, tokenizer, device, prompts, ["final"])["final"]


def evaluate_answers(
    cfg,
    model,
    head,
    tokenizer,
    device: str,
    rows: Sequence[dict],
    *,
    source: str | None = None,
    adapter: Path | None = None,
    base: bool | list[str] = False,
) -> dict:
    """Answer accuracy as the report holds it: the tuned model's heads (the ensemble with a routed
    MoDE head, and the final layer) and, with `base`, the base before tuning (adapter off, final
    head; a list is the base's generations already made).

    `source` and `adapter` (the trained adapter's folder, None without one) rebuild a 4-bit model
    as a dequantized copy on the CPU, once for both sides (`decoding_sides`).
    """
    prompts = answer_prompts(cfg, rows, tokenizer)
    base_texts = base if isinstance(base, list) else None
    kinds = ["ensemble", "final"] if has_ensemble(head) else ["final"]
    sides = ["base", "tuned"] if base is True else ["tuned"]
    with closing(
        decoding_sides(cfg, model, device, sides, source=source, adapter=adapter)
    ) as decoders:
        for side, decoder in decoders:
            if side == "base":
                base_texts = decode_answers(
                    cfg, decoder, None, tokenizer, device, prompts, ["final"]
                )["final"]
            else:
                outputs = decode_answers(cfg, decoder, head, tokenizer, device, prompts, kinds)
    field = cfg.eval.answer_field
    result = score(
        [str(row[field]) for row in rows],
        prompts.texts,
        outputs,
        cfg.eval.answer_match,
        base=base_texts,
    )
    result.update(
        {
            "field": field,
            "match": cfg.eval.answer_match,
            "max_new_tokens": cfg.eval.max_new_tokens,
            "decoded_from": "dequantized" if decodes_dequantized(model, device) else "loaded",
        }
    )
    return result
