"""The model card of an export (`README.md`): Hugging Face's YAML front matter, what MoDE is, the
run's per-layer table and answer accuracy from its report, the recipe, and how to load the model in
transformers, lm-evaluation-harness and vLLM."""

from __future__ import annotations

from pathlib import Path

import yaml
from omegaconf import DictConfig

from mode_cli.config import method
from mode_cli.eval.render import (
    ANSWER_COLUMNS,
    answers_model,
    answers_rows,
    header,
    markdown_table,
    summary_line,
    table_rows,
)
from mode_cli.models.smollm2 import MODEL_NAME as SMOLLM2_NAME

# The hub id of the packaged default model (`package:smollm2`).
PACKAGED_MODELS = {"package:smollm2": f"HuggingFaceTB/{SMOLLM2_NAME}"}

MODE_SUMMARY = (
    "MoDE (Mixture-of-Depths Ensemble, Luo & Specia, arXiv 2410.13077) treats a model's last few "
    "layers as an ensemble: each selected layer's state goes through its own trained norm and the "
    "shared LM head, and a learned router mixes them into the prediction. Tuned with `mode`, "
    "QLoRA-style, with an auxiliary loss that keeps the late layers predictive."
)


def hub_id(name: str) -> str | None:
    """The Hugging Face hub id a model or dataset source names, or None (a local file or folder,
    a bundled file, a tiny test model)."""
    if name in PACKAGED_MODELS:
        return PACKAGED_MODELS[name]
    if name.startswith(("tiny:", "package:", "bundled:", ".", "/", "~")) or Path(name).exists():
        return None
    return name if name.count("/") == 1 else None


def front_matter(cfg: DictConfig, head_kind: str) -> dict:
    """The card's metadata, as the hub reads it."""
    meta: dict = {}
    base = hub_id(cfg.model.name_or_path)
    if base:
        meta["base_model"] = base
    meta["library_name"] = "transformers"
    meta["pipeline_tag"] = "text-generation"
    tags = ["mode", "mixture-of-depths-ensemble"]
    if method(cfg).trains_adapter:
        tags += ["peft", "dora" if cfg.adapter.use_dora else "lora"]
    if head_kind == "ensemble":
        tags.append("custom_code")
    meta["tags"] = tags
    sources = [cfg.data.train, *(source.train for source in cfg.data.get("mix") or [])]
    datasets = [d for d in dict.fromkeys(hub_id(str(s)) for s in sources if s) if d]
    if datasets:
        meta["datasets"] = datasets
    return meta


def training_data(data_cfg: DictConfig) -> str:
    """What the run trained on, in words: its source and format, or each `data.mix` source with
    its format and weight."""
    mix = data_cfg.get("mix") or []
    if not mix:
        return f"{data_cfg.train} ({data_cfg.format})"
    return "; ".join(
        f"{src.train} ({src.format or data_cfg.format}, weight {src.weight:g})" for src in mix
    )


def recipe_rows(cfg: DictConfig, head: dict | None) -> list[tuple[str, str]]:
    """The settings a reader of the card wants first; the whole recipe is `mode_config.yaml`.
    `head` is the MoDE head's description (`MoDEHead.describe()`), None without one."""
    rows = [
        ("recipe", cfg.recipe),
        ("base model", cfg.model.name_or_path),
        ("data", training_data(cfg.data)),
        ("method", f"loss={cfg.loss.name}, distillation weight {cfg.loss.distill_weight}"),
    ]
    if head is not None:
        layers = ", ".join(map(str, head["layers"]))
        rows += [
            ("MoDE layers", f"{layers} of {head['num_layers']}"),
            (
                "router",
                head["router"] + (", layer N's own norm" if head.get("train_final_norm") else ""),
            ),
        ]
    if method(cfg).trains_adapter:
        adapter = "DoRA" if cfg.adapter.use_dora else "LoRA"
        rows.append(("adapter", f"{adapter} r={cfg.adapter.r}, alpha={cfg.adapter.alpha}"))
    rows += [
        ("training", f"{cfg.train.max_steps} steps, lr {cfg.train.lr}, {cfg.model.quantization}"),
        ("merged onto", f"the {cfg.merge.base} base, saved in {cfg.merge.dtype}"),
    ]
    return rows


def results(report: dict) -> list[str]:
    """The run's report as the card shows it: the per-layer table and the answer accuracy."""
    lines = [
        "## Results",
        "",
        f"From the run's eval report ({report['data']['examples']} examples of "
        f"`{report['data']['eval']}`, {report['data']['tokens']:,} response tokens). "
        f"{summary_line(report)[:1].upper()}{summary_line(report)[1:]}.",
        "",
        *markdown_table(header(report), table_rows(report)),
    ]
    lines += [
        "",
        "Every layer read through the LM head (logit lens: the trained norm for the MoDE layers, "
        "marked *); base: the model before tuning. Loss in nats per next token.",
    ]
    answers = report.get("answers")
    if answers:
        lines += [
            "",
            f"Answer accuracy: greedy answers to {answers['examples']} eval questions, exact "
            f"match after `{answers['match']}` normalisation, with 95% Wilson intervals.",
            "",
            *markdown_table(ANSWER_COLUMNS, answers_rows(answers, answers_model(report))),
        ]
    return lines


def usage(head_kind: str) -> list[str]:
    trust = ", trust_remote_code=True" if head_kind == "ensemble" else ""
    trust_arg = ",trust_remote_code=True" if head_kind == "ensemble" else ""
    lines = [
        "## Use",
        "",
        "transformers (`pip install transformers torch`):",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'path = "path/to/this/folder"',
        f"model = AutoModelForCausalLM.from_pretrained(path{trust})",
        "tokenizer = AutoTokenizer.from_pretrained(path)",
        'messages = [{"role": "user", "content": "What is 12 + 30?"}]',
        "inputs = tokenizer.apply_chat_template(",
        '    messages, add_generation_prompt=True, return_tensors="pt", return_dict=True',
        ")",
        "output = model.generate(**inputs, max_new_tokens=64, do_sample=False)",
        'print(tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))',
        "```",
        "",
        "The chat template is the prompt format the model was trained with, and generation stops "
        "at its end of turn (`generation_config.json`).",
        "",
        "[lm-evaluation-harness](https://github.com/EleutherAI/lm-evaluation-harness):",
        "",
        "```bash",
        f"lm_eval --model hf --model_args pretrained=path/to/this/folder{trust_arg} --tasks ...",
        "```",
        "",
    ]
    if head_kind == "ensemble":
        lines += [
            "vLLM (its Transformers backend runs the model's own code; not tested by `mode`):",
            "",
            "```bash",
            "vllm serve path/to/this/folder --trust-remote-code --model-impl transformers",
            "```",
            "",
            "The files `modeling_mode.py` and `mode_head.py` are the model's code (torch and "
            "transformers only); without `trust_remote_code=True` transformers refuses to load "
            "the folder rather than load it without the ensemble.",
        ]
    else:
        lines += [
            "vLLM and other engines load it as a plain model of its family "
            "(`vllm serve path/to/this/folder`).",
        ]
    return lines


def model_card(cfg: DictConfig, *, head_kind: str, head: dict | None, report: dict | None) -> str:
    """The README.md of an export of a run with the recipe `cfg` and the head `head` describes,
    decoding with `head_kind`; `report` is the run's newest eval report, if it has one."""
    meta = yaml.safe_dump(front_matter(cfg, head_kind), sort_keys=False).strip()
    title = cfg.recipe or "mode run"
    decodes = (
        "This folder decodes with **the MoDE ensemble**: the base model's forward returns the "
        "routed mix of the selected layers' normed states, and the model's own LM head "
        "projects it."
        if head_kind == "ensemble"
        else "This folder decodes with **the final layer alone**: a plain model of its family"
        + (
            ", the MoDE head left out of its forward (`mode` can still decode its ensemble from "
            "the `mode_head.*` files beside it)."
            if method(cfg).routed
            else "."
        )
    )
    lines = [
        "---",
        meta,
        "---",
        "",
        f"# {title} ({'MoDE ensemble' if head_kind == 'ensemble' else 'final layer'})",
        "",
        MODE_SUMMARY,
        "",
        decodes,
        "",
    ]
    if report:
        lines += [*results(report), ""]
    lines += [
        "## Training recipe",
        "",
        *markdown_table(("setting", "value"), recipe_rows(cfg, head)),
        "",
        "The whole resolved recipe is `mode_config.yaml`.",
        "",
        *usage(head_kind),
    ]
    return "\n".join(lines) + "\n"
