"""Train the tiny byte-level BPE tokenizer bundled at ``mode_cli/bundled/tiny-tokenizer``.

The tokenizer is trained on the bundled arithmetic dataset (train + eval) rendered through
the Alpaca prompt template, plus the raw instruction/input/output strings, so that a toy
model built on it can be trained and tested offline. It uses a ByteLevel pre-tokenizer and
decoder, so every string (any Unicode) round-trips through encode/decode, and a single
special token ``<|endoftext|>`` that serves as eos, bos, pad and unk.

Training is deterministic: the same data and ``--vocab-size`` give an identical
``tokenizer.json``. Run it from the repository root after ``make_arithmetic_data.py``::

    python scripts/make_tiny_tokenizer.py                   # vocab size 512
    python scripts/make_tiny_tokenizer.py --vocab-size 1024 --out /tmp/tok
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT / "mode_cli" / "bundled" / "arithmetic"
DEFAULT_OUT = ROOT / "mode_cli" / "bundled" / "tiny-tokenizer"

EOS = "<|endoftext|>"

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


def render(row: dict[str, str]) -> str:
    """Render an alpaca row as prompt + response, the way finetuning will see it."""
    template = PROMPT_WITH_INPUT if row.get("input") else PROMPT_NO_INPUT
    return (
        template.format(instruction=row["instruction"], input=row.get("input", "")) + row["output"]
    )


def load_split(data_dir: Path, split: str) -> list[dict[str, str]]:
    """Load ``{split}.jsonl`` from ``data_dir`` as a list of row dicts, in file order."""
    with (data_dir / f"{split}.jsonl").open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def training_texts(rows: Iterable[dict[str, str]]) -> Iterator[str]:
    """Yield the training corpus: each row rendered, then its non-empty raw fields.

    The rows contain both prompt variants (with and without "input"), so both template
    shells are learnt; the raw fields weight the merges towards the problem text itself.
    """
    for row in rows:
        yield render(row)
        for key in ("instruction", "input", "output"):
            if row.get(key):
                yield row[key]


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE tokenizer on ``texts`` with ``vocab_size`` entries in total."""
    tok = Tokenizer(models.BPE())
    # add_prefix_space=False: a prefix space would be added on encode and would break the
    # exact decode(encode(x)) == x round trip.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # As in GPT-2: offsets keep the leading space, so they tile the text with no gaps.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        # All 256 byte symbols are seeded so unseen characters still encode (no unk needed).
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: train, save with transformers, then verify the result."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab-size", type=int, default=512, help="total vocab (default 512)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="dir with *.jsonl")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output dir ({DEFAULT_OUT})")
    args = parser.parse_args(argv)
    # 256 byte symbols + the special token is the floor for a byte-level BPE.
    if args.vocab_size < 257:
        parser.error("--vocab-size must be at least 257")

    # Never reach for the Hub: everything here is local. The variable is read when
    # transformers/huggingface_hub are imported, hence the late import below.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    train_rows = load_split(args.data, "train")
    eval_rows = load_split(args.data, "eval")
    # Fixed order (train then eval) so training is reproducible.
    tok = train_tokenizer(list(training_texts(train_rows + eval_rows)), args.vocab_size)

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=EOS,
        model_max_length=4096,
        # The decoder already restores text exactly; cleanup would alter spaces before
        # punctuation and break the round trip.
        clean_up_tokenization_spaces=False,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(args.out))

    # Reload through AutoTokenizer exactly as the CLI will, and check the essentials.
    loaded = AutoTokenizer.from_pretrained(str(args.out))
    eos_id = loaded.convert_tokens_to_ids(EOS)
    assert loaded.eos_token_id == eos_id and loaded.pad_token_id == eos_id, "eos/pad not set"
    samples = [
        render(train_rows[0]),
        "Unicode: héllo wörld, 日本語, emoji 🤖🧮, tabs\tand\nnewlines, trailing space ",
    ]
    for text in samples:
        ids = loaded(text, add_special_tokens=False)["input_ids"]
        assert loaded.decode(ids) == text, f"round trip failed for {text!r}"

    lengths = [len(loaded(render(r), add_special_tokens=False)["input_ids"]) for r in train_rows]
    print(f"saved {args.out} | vocab size {len(loaded)} | eos/pad id {eos_id}")
    if len(loaded) < args.vocab_size:
        # BPE stops early once no pair occurs at least min_frequency times in the corpus.
        print(f"note: corpus supports only {len(loaded)} tokens (asked for {args.vocab_size})")
    print(
        f"tokens per rendered example: mean {sum(lengths) / len(lengths):.1f}, "
        f"max {max(lengths)} (over {len(train_rows)} train rows)"
    )


if __name__ == "__main__":
    main()
