"""The `key=value` words of the command line that are `mode`'s own options rather than recipe keys:
`recipe=` of `mode train`, `checkpoint=` and the shorthands of `mode eval`, and the decoding options
of `mode generate` and `mode chat`. One parser for all of them; one error lists every problem.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mode_cli.errors import ModeError
from mode_cli.mode.methods import HEAD_KINDS


@dataclass(frozen=True)
class Option:
    """How one option's value is read: `parse` raises ValueError on a bad value; `expected` says
    what was expected, for the message."""

    parse: Callable[[str], Any]
    expected: str


TEXT = Option(str, "text")


def integer(minimum: int | None = None) -> Option:
    def parse(value: str) -> int:
        number = int(value)
        if minimum is not None and number < minimum:
            raise ValueError(value)
        return number

    return Option(parse, "an integer" if minimum is None else f"a whole number >= {minimum}")


def number(minimum: float | None = None) -> Option:
    def parse(value: str) -> float:
        result = float(value)
        if minimum is not None and result < minimum:
            raise ValueError(value)
        return result

    return Option(parse, "a number" if minimum is None else f"a number >= {minimum:g}")


def choice(*allowed: str) -> Option:
    def parse(value: str) -> str:
        if value not in allowed:
            raise ValueError(value)
        return value

    return Option(parse, f"one of {', '.join(allowed)}")


def parse_options(
    words: list[str],
    options: dict[str, Option],
    *,
    rest_allowed: bool = False,
    problems: list[str] | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """Read the words that name one of `options` (`key=value`, the last one wins).

    Returns (the values read, by key; the other words in order). The other words are an error
    unless `rest_allowed` (`mode train` and `mode eval` pass them on as recipe overrides, which
    Hydra's grammar reads). Every problem is listed in one ModeError, or appended to `problems`
    when the caller has more to check before raising (`raise_problems`).
    """
    found: list[str] = []
    values: dict[str, Any] = {}
    rest: list[str] = []
    for word in words:
        key, sep, value = word.partition("=")
        if key in options and sep:
            option = options[key]
            try:
                values[key] = option.parse(value)
            except ValueError:
                found.append(f"{key}={value!r}: expected {option.expected}")
        elif rest_allowed:
            rest.append(word)
        elif not sep:
            found.append(f"expected key=value, got '{word}'")
        else:
            found.append(f"unknown option '{key}' (options: {', '.join(options)})")
    if problems is None:
        raise_problems(found)
    else:
        problems += found
    return values, rest


def raise_problems(problems: list[str]) -> None:
    """One ModeError listing every problem, if there is any."""
    if problems:
        raise ModeError("Invalid options:\n" + "\n".join(f"  - {p}" for p in problems))


# ---------------------------------------------------------------------------- generate and chat


@dataclass
class DecodingOptions:
    """What `mode generate` and `mode chat` take after `checkpoint=` (key=value each)."""

    prompt: str | None = None
    head: str = "ensemble"
    max_new_tokens: int = 256
    temperature: float = 0.0
    seed: int = 0


DECODING = {
    "prompt": TEXT,
    "head": choice(*HEAD_KINDS),
    "max_new_tokens": integer(minimum=1),
    "temperature": Option(number(minimum=0).parse, "a number >= 0 (0: greedy)"),
    "seed": integer(),
}


def decoding_options(words: list[str], *, with_prompt: bool) -> DecodingOptions:
    """The options of `mode generate` (`with_prompt`) or `mode chat`, after `checkpoint=`."""
    known = {key: option for key, option in DECODING.items() if with_prompt or key != "prompt"}
    problems: list[str] = []
    values, _ = parse_options(words, known, problems=problems)
    if with_prompt and not values.get("prompt"):
        problems.append('prompt="..." is required: the text to answer')
    raise_problems(problems)
    return DecodingOptions(**values)
