"""Using a finished run from Python: the model decodes from the MoDE ensemble head.

    from mode_cli import load, prompt_inputs
    model, tokenizer = load("outputs/smollm2-arithmetic/<time>")  # a run folder, or its merged/
    inputs = prompt_inputs(model, tokenizer, "What is 12 + 30?")  # the run's prompt, as trained
    output = model.generate(**inputs, max_new_tokens=48, do_sample=False)  # the ensemble head, KV cache on
    print(tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))

`load` accepts a run folder (config.yaml, adapter/, mode_head.*: the base is loaded as the run
trained it, 4-bit by default, with the adapter) or the run's merged folder (the exported model and
the run's recipe, mode_config.yaml). For a run with an ensemble, the returned model is the class
an export carries (`MoDEForCausalLM`) around the loaded modules: its forward and `generate()` use
the ensemble, KV cache included; `use_head(model, "final")` switches to the model's own final
layer for a block. A run without one (loss=final-only, layerwise) is loaded with `head="final"`
and gives the transformers (or peft) model.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from mode_cli.artifacts import (
    MERGED_CONFIG,
    RUN_CONFIG,
    classify,
    load_merged,
    load_run,
    load_run_config,
)
from mode_cli.data.tokenizing import adds_special_tokens
from mode_cli.decode import ensemble
from mode_cli.decode.chat import format_prompt as run_prompt
from mode_cli.devices import resolve_device
from mode_cli.errors import ModeError
from mode_cli.mode.head import has_ensemble
from mode_cli.models.loading import QUANTIZATIONS


def load_model(
    path: str | Path,
    *,
    head: str = "ensemble",
    device: str | None = None,
    quantization: str | None = None,
):
    """(model, MoDE head or None, tokenizer, recipe) of a run or merged folder: the base model of the
    run's family (with its adapter, for a run folder) and the trained head beside it.

    quantization: `nf4` or `none`; None keeps the run's own setting for a run folder (as trained)
    and loads a merged folder dense.
    """
    checkpoint = classify(Path(path).expanduser(), plain_models=False)
    path = checkpoint.path
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ModeError(
            f"quantization={quantization!r}: expected one of {', '.join(QUANTIZATIONS)}"
        )
    device = device or resolve_device("auto")
    cfg = load_run_config(path, RUN_CONFIG if checkpoint.kind == "run" else MERGED_CONFIG)
    ensemble.check_recipe_head_kind(head, cfg.loss.name, where=str(path))
    if checkpoint.kind == "run":
        if quantization is not None:
            cfg.model.quantization = quantization
        model, mode_head, tokenizer = load_run(path, cfg, device)
    else:
        cfg.model.quantization = quantization or "none"
        model, mode_head, tokenizer = load_merged(
            path, cfg, device, require_head=head == "ensemble"
        )
    model.eval()
    return model, mode_head, tokenizer, cfg


def load(
    path: str | Path,
    *,
    head: str = "ensemble",
    device: str | None = None,
    quantization: str | None = None,
) -> tuple[nn.Module, object]:
    """(model, tokenizer) of a run folder or a merged folder, decoding with `head`.

    Args:
        path: a run folder written by `mode train`, or its `merged/` folder.
        head: `ensemble` (the MoDE head's mix of the late layers) or `final` (the last layer
            alone). A run trained with loss=final-only has no ensemble.
        device: `cuda` or `cpu`; None picks CUDA when available.
        quantization: `nf4` or `none`; None loads a run's base as it was trained (4-bit by
            default) and a merged model dense.

    The model is in eval mode. For a run with an ensemble it is a `MoDEForCausalLM` sharing the
    loaded modules: `use_head(model, "final")` switches the head for a block. `format_prompt(model,
    tokenizer, text)` applies the run's prompt template.
    """
    model, mode_head, tokenizer, cfg = load_model(
        path, head=head, device=device, quantization=quantization
    )
    if has_ensemble(mode_head):
        model = ensemble.wrap(model, mode_head, head).eval()
    model.mode_config = cfg
    return model, tokenizer


def use_head(model: nn.Module, kind: str):
    """Context manager: decode with `kind` (`ensemble` or `final`) inside the block."""
    return ensemble.use_head(model, kind)


def format_prompt(model: nn.Module, tokenizer, text: str) -> str:
    """`text` as one user turn in the run's prompt format (Alpaca template, chat template, ...).
    To tokenize it as training did, use `prompt_inputs`."""
    cfg = getattr(model, "mode_config", None)
    if cfg is None:
        raise ModeError(
            "format_prompt needs a model from mode_cli.load (it reads the run's recipe)"
        )
    return run_prompt(text, cfg, tokenizer)


def prompt_inputs(model: nn.Module, tokenizer, text: str):
    """`text` as one user turn in the run's prompt format, tokenized as training tokenized its
    prompts (a chat template's own special tokens, the tokenizer's for an Alpaca prompt), as
    tensors on the model's device: ready for `model.generate(**inputs)`."""
    cfg = getattr(model, "mode_config", None)
    if cfg is None:
        raise ModeError(
            "prompt_inputs needs a model from mode_cli.load (it reads the run's recipe)"
        )
    inputs = tokenizer(
        run_prompt(text, cfg, tokenizer),
        add_special_tokens=adds_special_tokens(cfg.data.format),
        return_tensors="pt",
    )
    return inputs.to(model.device)


def harness_dir() -> Path:
    """The folder of mode's lm-evaluation-harness tasks (`lm_eval --include_path`)."""
    from mode_cli.eval.harness import HARNESS_DIR

    return HARNESS_DIR
