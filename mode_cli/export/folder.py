"""An exported model folder: what `merged/` and `mode export` write, a model transformers loads alone.

    <folder>/
      config.json, model.safetensors   the ensemble: a MoDE model (`model_type: mode`, `auto_map`),
                                       the head's norms and router in the weights (model.mode_head.*);
                                       the final layer: a plain model of the base family
      modeling_mode.py, mode_head.py   the ensemble model's code: imports torch and transformers only
      generation_config.json           EOS: the tokenizer's and the chat template's end of turn
      tokenizer files, chat template   the run's prompt format as the chat template
      README.md                        the model card (`card.py`)
      mode_config.yaml                 the run's recipe: `mode eval/generate/chat` read the folder
      mode_head.json, .safetensors     a final-layer export of a run with a head: the head, so
                                       `mode` can still decode its ensemble
      init_from.json                   a run started with init_from=: what it started from

The folder is written beside its target and renamed into place when complete.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from torch import nn

from mode_cli.artifacts import MERGED_CONFIG, save_head
from mode_cli.data.formats import alpaca_chat_template, chat_template, run_formats
from mode_cli.decode.ensemble import unwrap, wrap
from mode_cli.decode.generate import eos_setting, run_stop_ids
from mode_cli.eval.report import EVAL_FOLDER
from mode_cli.files import staged_folder
from mode_cli.mode import head as head_module
from mode_cli.mode.head import MoDEHead
from mode_cli.models import modeling_mode

# The ensemble model's code, as the export names the files (`modeling_mode.py` imports the head
# from the file beside it).
MODEL_CODE = {
    "modeling_mode.py": Path(modeling_mode.__file__),
    "mode_head.py": Path(head_module.__file__),
}
CARD = "README.md"


def chat_template_for(cfg: DictConfig, tokenizer) -> str | None:
    """The chat template an export carries: the run's prompt format, so that an engine applying
    the model's template prompts it as training did. `chat` runs: the template they trained with;
    `alpaca` runs: the Alpaca template; `text` runs: the tokenizer's own (None)."""
    data_format = cfg.data.format
    if data_format == "chat":
        return chat_template(cfg.data, tokenizer)
    if data_format == "alpaca":
        probe = tokenizer("x")["input_ids"]
        adds_bos = tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id]
        return alpaca_chat_template(bos_token=adds_bos)
    return None


def pinned_chat_template(cfg: DictConfig, tokenizer) -> DictConfig:
    """The recipe an export records, its chat rows' template written out when the folder's own
    template is another: a `data.mix` of Alpaca and chat rows exports the Alpaca template, and
    `mode eval`, `mode generate` and the stop ids of the folder still render its chat rows as
    training did."""
    if "chat" not in run_formats(cfg.data) or cfg.data.chat_template is not None:
        return cfg
    used = chat_template(cfg.data, tokenizer)
    if chat_template_for(cfg, tokenizer) == used:
        return cfg
    cfg = copy.deepcopy(cfg)
    cfg.data.chat_template = used
    return cfg


def write_generation_config(folder: Path, model: nn.Module, tokenizer, stops: list[int]) -> None:
    """`generation_config.json`: the model's own, stopping at `stops`, padding with the tokenizer's
    pad token."""
    config = copy.deepcopy(model.generation_config)
    config.eos_token_id = eos_setting(stops)
    config.pad_token_id = tokenizer.pad_token_id
    if tokenizer.bos_token_id is not None:
        config.bos_token_id = tokenizer.bos_token_id
    config.save_pretrained(folder)


def write_export(
    target: Path,
    *,
    cfg: DictConfig,
    model: nn.Module,
    head: MoDEHead | None,
    tokenizer,
    head_kind: str,
    card: str,
    records: list[Path] = (),
) -> Path:
    """Write the export of `model` (a merged CausalLM of a supported family, on the CPU) and its
    trained `head` into `target` (replaced if it exists), decoding with `head_kind`.

    The ensemble export is `MoDEForCausalLM` around the model and the head, saved with its code;
    the final-layer export is the model as it is, with the head beside it for `mode`. `records`
    (files of the run, such as `init_from.json`) are copied in beside them.
    """
    with staged_folder(target, replace=True) as staging:
        if head_kind == "ensemble":
            wrapped = wrap(model, head, "ensemble")
            try:
                wrapped.save_pretrained(staging)
            finally:
                unwrap(wrapped)
            for name, source in MODEL_CODE.items():
                shutil.copyfile(source, staging / name)
        else:
            model.save_pretrained(staging)
            if head is not None:
                save_head(head, staging)
        cfg = pinned_chat_template(cfg, tokenizer)
        stops = run_stop_ids(cfg.data, tokenizer)
        template = chat_template_for(cfg, tokenizer)
        if template is not None:
            tokenizer.chat_template = template
        tokenizer.save_pretrained(staging)
        write_generation_config(staging, model, tokenizer, stops)
        (staging / MERGED_CONFIG).write_text(OmegaConf.to_yaml(cfg, resolve=True))
        (staging / CARD).write_text(card)
        for record in records:
            shutil.copyfile(record, staging / record.name)
        reports = target / EVAL_FOLDER
        if reports.is_dir():  # `mode eval` reports of a folder written again (a resume) stay
            shutil.copytree(reports, staging / EVAL_FOLDER)
    return target
