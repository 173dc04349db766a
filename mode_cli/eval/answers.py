"""Answer accuracy: greedy generations decoded with the ensemble and with the final head, scored
by exact match against a dataset's reference answers.

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

import re
from collections.abc import Callable, Sequence

from mode_cli.data.formats import row_format, row_prompt
from mode_cli.data.sources import eval_rows
from mode_cli.decode.generate import generate_texts
from mode_cli.errors import ModeError
from mode_cli.eval.report import data_description
from mode_cli.mode.head import has_ensemble

# `eval.answers`: `auto` scores answers in `mode eval` when the eval rows have them; `on` also at the
# end of training (and requires them); `off`.
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


def score(
    references: Sequence[str],
    prompts: Sequence[str],
    outputs: dict[str, Sequence[str]],
    match: str,
    examples_per_kind: int = 3,
) -> dict:
    """Accuracy per head, the (ensemble, final) agreement counts and a few disagreements.

    `outputs` maps a head (`ensemble`, `final`) to its generations, one per reference. With
    both heads, `agreement` counts both right / ensemble only / final only / both wrong, and
    `disagreements` holds up to `examples_per_kind` examples of each one-sided kind.
    """
    n = len(references)
    correct = {
        head: [is_correct(text, ref, match) for text, ref in zip(texts, references, strict=True)]
        for head, texts in outputs.items()
    }
    heads = {
        head: {"correct": sum(hits), "accuracy": sum(hits) / n if n else 0.0}
        for head, hits in correct.items()
    }
    result: dict = {"examples": n, "heads": heads, "agreement": None, "disagreements": None}
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

    `auto=False` treats `eval.answers=auto` as off: the end-of-training report generates only
    when asked to (`on`), since generation from a 4-bit model on a CPU takes minutes.
    """
    if cfg.eval.answers == "off" or (cfg.eval.answers == "auto" and not auto):
        return None
    rows = eval_rows(cfg.data)
    field = cfg.eval.answer_field
    if cfg.eval.answers == "auto" and not has_answers(rows, field):
        return None
    check_answers_available(rows, field, data_description(cfg.data))
    return list(rows[: cfg.eval.answer_examples])


def answer_accuracy(
    model,
    head,
    tokenizer,
    rows: Sequence[dict],
    prompts: Sequence[str],
    *,
    formats: Sequence[str],
    field: str,
    match: str,
    device: str,
    max_new_tokens: int,
    batch_size: int,
) -> dict:
    """Generate greedily with each head the model has and score the answers.

    The ensemble head exists only with a routed MoDE head; the final head always. `formats`: the
    format each prompt was rendered in, so it is tokenized as training tokenized it.
    """
    heads = ["ensemble", "final"] if has_ensemble(head) else ["final"]
    outputs = {
        kind: generate_texts(
            model,
            head,
            tokenizer,
            list(prompts),
            formats=formats,
            head_kind=kind,
            max_new_tokens=max_new_tokens,
            device=device,
            batch_size=batch_size,
        )
        for kind in heads
    }
    result = score([str(row[field]) for row in rows], prompts, outputs, match)
    result.update({"field": field, "match": match, "max_new_tokens": max_new_tokens})
    return result


def evaluate_answers(cfg, model, head, tokenizer, device: str, rows: Sequence[dict]) -> dict:
    """Answer accuracy of a model (and head) on `rows` from `answer_rows`, as the report holds it."""
    prompts = [row_prompt(row, cfg.data, tokenizer) for row in rows]
    return answer_accuracy(
        model,
        head,
        tokenizer,
        rows,
        prompts,
        formats=[row_format(row, cfg.data) for row in rows],
        field=cfg.eval.answer_field,
        match=cfg.eval.answer_match,
        device=device,
        max_new_tokens=cfg.eval.max_new_tokens,
        batch_size=cfg.eval.answer_batch_size,
    )
