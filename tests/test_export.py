"""The exported model: what plain transformers loads from it equals mode's ensemble.

For every family mode trains (the 8 tiny families, the Llama-3 shape; SmolLM2 in
tests/test_export_smollm2.py), every router and `train_final_norm`: an export's logits, loaded with
`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` in an interpreter where
`mode_cli` cannot be imported (tests/plain_transformers.py), equal mode's ensemble logits within
1e-4 in fp32, and its greedy `generate()` gives mode's tokens on 16 prompts. Also: a plain load
refuses, bf16, sampling, the KV cache, `device_map="auto"`, `pipeline`, `mode export` and its bad
input, the model card, the stop tokens.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from helpers import OLD_RUN, load_script, naive_ensemble_logits, old_run_copy, run_command
from omegaconf import OmegaConf
from transformers import AutoTokenizer

from mode_cli.data.formats import CHATML_TEMPLATE, alpaca_chat_template
from mode_cli.decode import generate as generate_mod
from mode_cli.decode.ensemble import use_head
from mode_cli.decode.generate import end_of_turn_id, stop_token_ids
from mode_cli.export.command import write
from mode_cli.files import resolve_bundled
from mode_cli.mode.head import MoDEHead
from mode_cli.models import families
from mode_cli.models.tiny import tiny_config
from mode_cli.recipes import compose_recipe

READER = Path(__file__).resolve().parent / "plain_transformers.py"
TINY = OmegaConf.create(
    {
        "hidden_size": 64,
        "num_layers": 4,
        "num_heads": 4,
        "num_kv_heads": 2,
        "intermediate_size": 128,
    }
)
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "gpt_neox")
# (family, router, train_final_norm): every family with the default router; every router; the
# final layer's own norm on a RMSNorm, a soft-capped and a LayerNorm family; Llama-3's shape.
CASES = [
    *[(family, "token", False) for family in FAMILIES],
    ("llama", "scalar", False),
    ("llama", "fixed", False),
    ("llama", "token", True),
    ("gemma2", "scalar", True),
    ("gpt_neox", "fixed", True),
    ("llama3", "token", False),
]
PROMPTS = [f"What is {a} + {b}?" for a, b in zip(range(3, 19), range(40, 24, -1), strict=True)]
STEPS = 8


def tokenizer():
    return AutoTokenizer.from_pretrained(str(resolve_bundled("bundled:tiny-tokenizer")))


def llama3_config(special: dict) -> transformers.LlamaConfig:
    """Meta-Llama-3's shape, shrunk: 4:1 grouped KV heads, its RoPE base and scaling, untied."""
    return transformers.LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=224,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        **special,
    )


def model_and_head(family: str, router: str, train_final_norm: bool, vocab: int):
    """A random-init model of the family and a MoDE head whose norms and router are far from
    their start (a trained head's are not at their init either)."""
    special = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
    torch.manual_seed(0)
    if family == "llama3":
        config = llama3_config(special)
    else:
        config = tiny_config(family, TINY, vocab, special)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    head = MoDEHead(
        families.final_norm(model),
        [2, 3, 4],
        4,
        64,
        router=router,
        fixed_weights=[0.2, 0.3, 0.5] if router == "fixed" else None,
        train_final_norm=train_final_norm,
    )
    with torch.no_grad():
        for param in head.parameters():
            param.add_(0.3 * torch.randn_like(param))
    return model, head.eval()


def mode_greedy(model, head, tok, ids: list[int], steps: int = STEPS, **sampling) -> list[int]:
    """What `mode generate` decodes from these prompt ids: its generation config, the ensemble."""
    temperature = sampling.get("temperature", 0.0)
    config = generate_mod.generation_config(tok, steps, temperature)
    batch = generate_mod.left_padded([ids], tok.pad_token_id, "cpu")
    if "seed" in sampling:
        torch.manual_seed(sampling["seed"])
    with use_head(model, "ensemble", head) as decoder, torch.no_grad():
        out = decoder.generate(**batch, generation_config=config)
    return out[0, len(ids) :].tolist()


def read_in_plain_transformers(tmp_path: Path, items: list[dict], timeout: float = 600) -> dict:
    job = tmp_path / "job.json"
    output = tmp_path / "results.pt"
    job.write_text(json.dumps({"exports": items, "output": str(output)}))
    result = run_command([sys.executable, str(READER), str(job)], timeout=timeout, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    return torch.load(output, weights_only=False)


def inputs_for(tok) -> dict:
    batch = tok(["What is 12 + 30?", "Name three colours of the rainbow"], padding=True)
    # Left padding, as generation pads a batch.
    ids = torch.tensor(batch["input_ids"])
    mask = torch.tensor(batch["attention_mask"])
    lengths = mask.sum(1)
    left = torch.zeros_like(ids)
    left_mask = torch.zeros_like(mask)
    for row, n in enumerate(lengths.tolist()):
        left[row, ids.shape[1] - n :] = ids[row, :n]
        left_mask[row, ids.shape[1] - n :] = 1
    return {"input_ids": left, "attention_mask": left_mask}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every case's model, head and export (fp32), and what plain transformers made of them."""
    root = tmp_path_factory.mktemp("exports")
    tok = tokenizer()
    inputs = inputs_for(tok)
    torch.save(inputs, root / "inputs.pt")
    prompt_ids = [generate_mod.prompt_ids(tok, p, "alpaca") for p in PROMPTS]
    cases, items = {}, []
    for family, router, train_final_norm in CASES:
        model, head = model_and_head(family, router, train_final_norm, len(tok))
        cfg = compose_recipe("tiny-llama-alpaca", [f"router={router}"])
        target = root / f"{family}-{router}-{train_final_norm}"
        write(target, cfg, model, head, tokenizer(), "ensemble", None)
        cases[(family, router, train_final_norm)] = (model, head, target)
        items.append(
            {
                "path": str(target),
                "inputs": str(root / "inputs.pt"),
                "prompts": prompt_ids,
                "max_new_tokens": STEPS,
                "sample_seed": 3,
                "device_map": family == "gemma2",
                "pipeline": family == "llama" and router == "token" and not train_final_norm,
            }
        )
    results = read_in_plain_transformers(root, items)
    return tok, inputs, prompt_ids, cases, results


@pytest.mark.parametrize("case", CASES, ids=["-".join(map(str, case)) for case in CASES])
def test_plain_transformers_decodes_the_ensemble_as_mode_does(exported, case):
    tok, inputs, prompt_ids, cases, results = exported
    model, head, target = cases[case]
    got = results[str(target)]
    assert got["class"] == "MoDEForCausalLM" and got["model_type"] == "mode"
    assert not got["mode_cli_imported"]
    with use_head(model, "ensemble", head) as decoder, torch.no_grad():
        ensemble = decoder(**inputs).logits
        final = model(**inputs).logits
    with torch.no_grad():
        naive = naive_ensemble_logits(model, head, inputs["input_ids"], inputs["attention_mask"])
    torch.testing.assert_close(ensemble, naive, atol=1e-5, rtol=1e-5)
    assert (got["logits"] - ensemble).abs().max().item() <= 1e-4
    assert (got["logits"] - final).abs().max().item() > 1e-2  # not the final layer
    # Greedy decoding, KV cache on: mode's tokens for all 16 prompts; and the same without cache.
    expected = [mode_greedy(model, head, tok, ids) for ids in prompt_ids]
    assert got["greedy"] == expected
    assert got["greedy_no_cache"] == expected[0]
    # Sampling with the same seed draws the same tokens (`mode generate temperature=1 seed=3`).
    assert got["sampled"] == mode_greedy(model, head, tok, prompt_ids[0], temperature=1.0, seed=3)
    if "device_map_logits" in got:
        assert (got["device_map_logits"] - ensemble).abs().max().item() <= 1e-4


def test_a_plain_load_refuses_with_transformers_own_message(exported):
    *_, cases, results = exported
    for _, _, target in cases.values():
        message = results[str(target)]["plain_load_error"]
        assert message.startswith("ValueError") and "trust_remote_code=True" in message


def test_pipeline_chats_in_the_runs_prompt_format(exported):
    tok, _, _, cases, results = exported
    model, head, target = cases[("llama", "token", False)]
    reply = results[str(target)]["pipeline_reply"]
    # The pipeline renders the chat with the export's template: the run's Alpaca prompt.
    prompt = generate_mod.prompt_ids(tok, alpaca_prompt_text("What is 2 + 2?"), "alpaca")
    expected = mode_greedy(model, head, tok, prompt)
    if tok.eos_token_id in expected:
        expected = expected[: expected.index(tok.eos_token_id)]
    assert reply == tok.decode(expected, skip_special_tokens=True)


def alpaca_prompt_text(text: str) -> str:
    from mode_cli.data.formats import alpaca_prompt

    return alpaca_prompt({"instruction": text})


def test_the_export_holds_its_code_config_and_head(exported):
    *_, cases, _ = exported
    model, head, target = cases[("gemma2", "scalar", True)]
    config = json.loads((target / "config.json").read_text())
    assert config["model_type"] == "mode" and config["architectures"] == ["MoDEForCausalLM"]
    assert config["auto_map"] == {
        "AutoConfig": "modeling_mode.MoDEConfig",
        "AutoModel": "modeling_mode.MoDEModel",
        "AutoModelForCausalLM": "modeling_mode.MoDEForCausalLM",
    }
    assert config["base_model_type"] == "gemma2"
    assert config["final_logit_softcapping"] == model.config.final_logit_softcapping
    assert config["mode_head"]["layers"] == [2, 3, 4] and config["mode_head"]["router"] == "scalar"
    assert config["mode_head"]["train_final_norm"] is True
    # Every tensor of the head is in the weights, under the base model (what AutoModel returns).
    from safetensors import safe_open

    with safe_open(str(target / "model.safetensors"), "pt") as weights:
        names = set(weights.keys())
    assert {f"model.mode_head.{name}" for name in head.state_dict()} <= names
    # The code imports torch and transformers only; the head's file is mode's own.
    code = (target / "modeling_mode.py").read_text()
    assert (target / "mode_head.py").read_text() == Path(
        sys.modules[MoDEHead.__module__].__file__
    ).read_text()
    imported = {
        line.split()[1].split(".")[0]
        for line in code.splitlines()
        if line.startswith(("import ", "from ")) and not line.startswith("from .")
    }
    assert imported == {"__future__", "copy", "functools", "torch", "transformers"}


@pytest.fixture(scope="module")
def bf16(exported, tmp_path_factory):
    """Two exports saved in bf16, loaded in bf16 in plain transformers."""
    root = tmp_path_factory.mktemp("bf16")
    tok, inputs, prompt_ids, cases, _ = exported
    chosen = [("llama", "token", False), ("gpt_neox", "fixed", True)]
    items = []
    for case in chosen:
        model, head, _ = cases[case]
        target = root / "-".join(map(str, case))
        cfg = compose_recipe("tiny-llama-alpaca", ["merge.dtype=bf16"])
        write(
            target,
            cfg,
            copy.deepcopy(model).to(torch.bfloat16),
            head,
            tokenizer(),
            "ensemble",
            None,
        )
        items.append(
            {"path": str(target), "inputs": str(root.parent / "inputs.pt"), "dtype": "bfloat16"}
        )
        torch.save(inputs, root.parent / "inputs.pt")
    return chosen, read_in_plain_transformers(root, items), root


def test_a_bf16_export_loads_in_bf16_close_to_the_fp32_ensemble(exported, bf16):
    """bf16 tolerance: the weights are rounded to bf16 (8 bits of mantissa); the head stays in
    fp32. Logits within 2% of their largest magnitude of the fp32 ensemble's, and equal (1e-2) to
    mode's ensemble over the same bf16 weights."""
    _, inputs, _, cases, _ = exported
    chosen, results, root = bf16
    for case in chosen:
        model, head, _ = cases[case]
        got = results[str(root / "-".join(map(str, case)))]
        with use_head(model, "ensemble", head) as decoder, torch.no_grad():
            fp32 = decoder(**inputs).logits
        scale = fp32.abs().max().item()
        assert (got["logits"] - fp32).abs().max().item() <= 0.02 * scale
        model16 = copy.deepcopy(model).to(torch.bfloat16)
        with use_head(model16, "ensemble", head) as decoder, torch.no_grad():
            mode16 = decoder(**inputs).logits.float()
        assert (got["logits"] - mode16).abs().max().item() <= 1e-2


# ---------------------------------------------------------------------------- stop tokens


def smollm2_tokenizer(smollm2_conversion):
    _, folder, _ = smollm2_conversion
    return AutoTokenizer.from_pretrained(str(folder))


def test_generation_stops_at_the_chat_templates_end_of_turn(smollm2_conversion):
    tok = smollm2_tokenizer(smollm2_conversion)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_id(tok, tok.chat_template) == im_end
    assert end_of_turn_id(tok, CHATML_TEMPLATE) == im_end
    # A tokenizer whose EOS is another token: both stop generation.
    tok.eos_token = "<|endoftext|>"
    assert stop_token_ids(tok, CHATML_TEMPLATE) == [tok.eos_token_id, im_end]
    # The Alpaca template ends a reply in plain text: EOS alone (training appends it).
    assert stop_token_ids(tok, alpaca_chat_template()) == [tok.eos_token_id]
    # A marker the tokenizer splits into pieces cannot be one stop id: EOS alone.
    tiny = tokenizer()
    assert stop_token_ids(tiny, CHATML_TEMPLATE) == [tiny.eos_token_id]


# ---------------------------------------------------------------------------- mode export


def test_mode_export_from_a_run_and_its_card(tiny_run, mode, tmp_path):
    out = tmp_path / "final-bf16"
    code, _, err = mode(
        "export",
        f"checkpoint={tiny_run}",
        f"out={out}",
        "head=final",
        "dtype=bf16",
        "base=original",
    )
    assert code == 0, err
    assert "final layer" in err
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["dtype"] == "bfloat16"
    recipe = OmegaConf.load(out / "mode_config.yaml")
    assert (recipe.merge.head, recipe.merge.dtype, recipe.merge.base) == (
        "final",
        "bf16",
        "original",
    )
    # The card: the hub's front matter, the run's tables, how to load it.
    card = (out / "README.md").read_text()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert "mode" in meta["tags"] and "lora" in meta["tags"]
    assert "base_model" not in meta  # a tiny test model is no hub model
    assert "| 4 * (final) |" in card and "| ensemble |" in card and "95% interval" in card
    assert "trust_remote_code" not in card  # a plain model
    ensemble_card = (tiny_run / "merged" / "README.md").read_text()
    assert "custom_code" in yaml.safe_load(ensemble_card.split("---\n")[1])["tags"]
    assert (
        "trust_remote_code=True" in ensemble_card and "--model-impl transformers" in ensemble_card
    )


def test_the_card_names_hub_models_and_datasets():
    from mode_cli.export.card import front_matter

    cfg = compose_recipe("smollm2-arithmetic")
    meta = front_matter(cfg, "ensemble")
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "datasets" not in meta  # the bundled data is no hub dataset
    cfg = compose_recipe("llama3-8b-alpaca")
    meta = front_matter(cfg, "final")
    assert meta["base_model"] == "meta-llama/Meta-Llama-3-8B"
    assert meta["datasets"] == [cfg.data.train] and "custom_code" not in meta["tags"]


def test_mode_export_of_an_old_run_decodes_its_ensemble(mode, tmp_path):
    """The 0.1.0 release's run folder: its export loads in plain transformers as its ensemble."""
    import shutil

    from mode_cli import load

    run = tmp_path / "run-0.1.0"
    shutil.copytree(Path(__file__).resolve().parent / "fixtures" / "run-0.1.0", run)
    out = tmp_path / "export"
    code, _, err = mode("export", f"checkpoint={run}", f"out={out}")
    assert code == 0, err
    tok = AutoTokenizer.from_pretrained(str(out))
    inputs = inputs_for(tok)
    torch.save(inputs, tmp_path / "inputs.pt")
    got = read_in_plain_transformers(
        tmp_path, [{"path": str(out), "inputs": str(tmp_path / "inputs.pt")}]
    )[str(out)]
    model, _ = load(run, device="cpu")  # the old run as trained: 4-bit base and adapter
    with torch.no_grad():
        expected = model(**inputs).logits
    assert (got["logits"] - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize(
    ("words", "message"),
    [
        (["out={tmp}/x"], "checkpoint= is required"),
        (["checkpoint={run}"], "out= is required"),
        (["checkpoint={run}", "out={tmp}/x", "head=middle"], "head='middle': expected one of"),
        (["checkpoint={run}", "out={tmp}/x", "dtype=int8"], "dtype='int8': expected one of"),
        (["checkpoint={run}", "out={tmp}/full"], "exists and is not empty"),
        (["checkpoint={run}", "out={run}/export"], "inside the checkpoint"),
        (["checkpoint={tmp}/nowhere", "out={tmp}/x"], "not found"),
        (["checkpoint={run}/merged", "out={tmp}/x", "base=original"], "merged already"),
        (["checkpoint={run}", "out={tmp}/x", "colour=red"], "unknown option 'colour'"),
    ],
)
def test_mode_export_refuses_bad_input(tiny_run, mode, tmp_path, words, message):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    words = [w.format(run=tiny_run, tmp=tmp_path) for w in words]
    code, _, err = mode("export", *words)
    assert code == 2 and message in " ".join(err.split()), err
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    assert not (tmp_path / "x").exists() and not (tiny_run / "export").exists()


def test_mode_export_of_a_folder_without_its_adapter_is_refused_before_loading(mode, tmp_path):
    """A run stopped before it saved `adapter/`, or a checkpoint's folder given for its run's:
    one message, naming the run's folder for a checkpoint, and nothing written."""
    import shutil

    run = old_run_copy(tmp_path)
    step = run / "checkpoints" / "step-000004"
    code, _, err = mode("export", f"checkpoint={step}", f"out={tmp_path / 'x'}")
    said = " ".join(err.split())
    assert code == 2 and "has no trained adapter" in said, err
    assert f"the run's folder is {run}" in said and "Traceback" not in err
    shutil.rmtree(run / "adapter")
    code, _, err = mode("export", f"checkpoint={run}", f"out={tmp_path / 'x'}")
    assert code == 2 and f"{run} has no trained adapter" in " ".join(err.split()), err
    assert not (tmp_path / "x").exists()


def test_export_from_python_checks_its_options_as_mode_export_does(tmp_path):
    from mode_cli.errors import ModeError
    from mode_cli.export.command import export

    run = OLD_RUN
    for option, message in (
        ({"dtype": "float16"}, "dtype='float16': expected one of fp32, bf16, fp16"),
        ({"base": "nonsense"}, "base='nonsense': expected one of"),
        ({"head": "middle"}, "head='middle': expected one of ensemble, final"),
    ):
        with pytest.raises(ModeError, match=message):
            export(run, tmp_path / "x", **option)
    assert not (tmp_path / "x").exists()


def test_exporting_a_merged_folder_again_keeps_its_weights(mode, tmp_path):
    """A merged folder of a bf16-trained run exported in fp32: its weights are read as they were
    saved, not rounded through the run's bf16 on the way."""

    from safetensors.torch import load_file

    merged = old_run_copy(tmp_path, "merged")
    recipe = OmegaConf.load(merged / "mode_config.yaml")
    recipe.train.precision = "bf16"
    recipe.merge.dtype = "fp32"
    OmegaConf.save(recipe, merged / "mode_config.yaml")
    out = tmp_path / "again"
    code, _, err = mode("export", f"checkpoint={merged}", f"out={out}", "head=final")
    assert code == 0, err
    before, after = load_file(merged / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    for name, weight in before.items():
        assert after[name].dtype == torch.float32 and torch.equal(after[name], weight), name


def test_a_mixed_runs_export_keeps_the_template_its_chat_rows_trained_with(tmp_path):
    """Alpaca rows and chat rows mixed: the export carries the Alpaca template (the run's
    `data.format`), and records the chat rows' own in its `mode_config.yaml`, so that decoding
    and evaluating the folder render them, and stop, as training did. Written again, it keeps
    the eval reports made of it."""
    from mode_cli.artifacts import load_run_config
    from mode_cli.data.formats import chat_template
    from mode_cli.export.folder import write_export

    cfg = compose_recipe("tiny-llama-alpaca", ["data=mix-sample"])
    tok = tokenizer()
    tok.chat_template = CHATML_TEMPLATE  # a tokenizer with its own template, as chat models have
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    trained_with = chat_template(cfg.data, tok)
    stops = generate_mod.run_stop_ids(cfg.data, tok)
    assert len(stops) == 2  # the EOS and <|im_end|>
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": 0}
    model = transformers.LlamaForCausalLM(tiny_config("llama", TINY, len(tok), ids))
    out = write_export(
        tmp_path / "x", cfg=cfg, model=model, head=None, tokenizer=tok, head_kind="final", card=""
    )
    saved = load_run_config(out, "mode_config.yaml")
    exported = AutoTokenizer.from_pretrained(str(out))
    assert exported.chat_template == chat_template(
        OmegaConf.create({"format": "alpaca"}), exported
    )  # the Alpaca template, for engines
    assert chat_template(saved.data, exported) == trained_with
    assert generate_mod.run_stop_ids(saved.data, exported) == stops
    config = json.loads((out / "generation_config.json").read_text())
    assert config["eos_token_id"] == stops
    # Written again (a finished run resumed): the reports `mode eval` wrote into it stay.
    (out / "eval" / "20261206-000000").mkdir(parents=True)
    (out / "eval" / "20261206-000000" / "report.md").write_text("kept")
    write_export(out, cfg=cfg, model=model, head=None, tokenizer=tok, head_kind="final", card="")
    assert (out / "eval" / "20261206-000000" / "report.md").read_text() == "kept"


def test_the_card_says_what_the_run_trained_on_and_what_its_folder_holds():
    """A mix's sources in the data row; the sentence on decoding the ensemble from the head's
    files only where the run trained a router."""
    from mode_cli.export.card import model_card

    mixed = compose_recipe("tiny-llama-alpaca", ["data=mix-sample"])
    card = model_card(mixed, head_kind="final", head=None, report=None)
    assert (
        "bundled:arithmetic/train.jsonl (alpaca, weight 2); bundled:chat/train.jsonl (chat, "
        "weight 1)" in card
    )
    assert "`mode_head.*` files beside it" in card  # loss=mode: a router
    for loss in ("final-only", "layerwise"):
        cfg = compose_recipe("tiny-llama-alpaca", [f"loss={loss}"])
        card = model_card(cfg, head_kind="final", head=None, report=None)
        assert "mode_head" not in card and "bundled:arithmetic/train.jsonl (alpaca)" in card


# ---------------------------------------------------------------------------- SmolLM2, chat


def test_a_smollm2_chat_runs_export_decodes_as_mode_and_stops_at_end_of_turn(
    smollm2_chat_run, tmp_path
):
    """The packaged SmolLM2 tuned on chat data: its merged folder, in plain transformers, gives
    the logits of mode's ensemble on the run (4-bit base and adapter, as trained) and mode's greedy
    tokens on 16 prompts in the run's chat format, and a chat reply ends at the template's end of
    turn, well before the token limit."""
    from mode_cli import load
    from mode_cli.api import prompt_inputs

    merged = smollm2_chat_run / "merged"
    run_model, tok = load(smollm2_chat_run, device="cpu")
    exported, _ = load(merged, device="cpu")  # mode reading the export: fp32, no 4-bit kernels
    inputs = inputs_for(tok)
    torch.save(inputs, tmp_path / "inputs.pt")
    prompts = [prompt_inputs(exported, tok, text)["input_ids"][0].tolist() for text in PROMPTS]
    limit = 200
    question = [{"role": "user", "content": "Tom has 3 apples and buys 4 more. How many now?"}]
    got = read_in_plain_transformers(
        tmp_path,
        [
            {
                "path": str(merged),
                "inputs": str(tmp_path / "inputs.pt"),
                "prompts": prompts,
                "max_new_tokens": STEPS,
                "chat": question,
                "chat_max_new_tokens": limit,
            }
        ],
    )[str(merged)]
    with torch.no_grad():
        expected = run_model(**inputs).logits
    assert (got["logits"] - expected).abs().max().item() <= 1e-4
    config = generate_mod.generation_config(tok, STEPS)
    greedy = []
    for ids in prompts:
        batch = generate_mod.left_padded([ids], tok.pad_token_id, "cpu")
        with torch.no_grad():
            out = exported.generate(**batch, generation_config=config)
        greedy.append(out[0, len(ids) :].tolist())
    assert got["greedy"] == greedy
    # The chat template's end of turn (<|im_end|>) stops generation.
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    stops = got["eos_token_id"] if isinstance(got["eos_token_id"], list) else [got["eos_token_id"]]
    assert im_end in stops
    reply = got["chat_reply"]
    assert reply[-1] == im_end and len(reply) < limit


# ---------------------------------------------------------------------------- docs and scripts


def test_the_readmes_transformers_example_runs_as_written(tiny_run, capsys):
    """README, "Deploying a tuned model": the transformers lines, on the tiny run's merged folder."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Deploying a tuned model", 1)[1]
    code = section.split("In transformers:", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert '"path/to/merged"' in code and "trust_remote_code=True" in code
    exec(code.replace('"path/to/merged"', repr(str(tiny_run / "merged"))), {})
    assert "What is 12 + 30?" in capsys.readouterr().out


def test_the_export_benchmark_runs_and_writes_its_section(tiny_run, tmp_path):
    """scripts/bench_export.py on the tiny run, one short round: both exports decode, side by
    side, and the section is written (the figures in docs/benchmarks.md are the demo model's)."""
    bench = load_script("bench_export")
    result = bench.measure(tiny_run, rounds=2, count=1, new_tokens=3, threads=1)
    assert result["classes"] == {"ensemble": "MoDEForCausalLM", "final": "LlamaForCausalLM"}
    assert len(result["round_ratios"]) == 2 and result["ratio"] > 0
    doc = tmp_path / "benchmarks.md"
    bench.write_section("bench_export", bench.markdown(result), doc)
    assert "| ensemble / final (all rounds) |" in doc.read_text()


def test_the_harness_script_checks_the_ensembles_log_likelihoods(tiny_run):
    """scripts/harness_exports.py on the tiny run, two documents a task: both exports scored,
    every choice's log-likelihood of the ensemble export within 1e-4 of mode's on the run."""
    load_script("harness_exports").main(["--run", str(tiny_run), "--limit", "2"])
    record = json.loads((tiny_run / "harness.json").read_text())
    assert set(record["ensemble"]) == {"mc_acc", "gen_exact_match"} == set(record["final"])
    check = record["ensemble_vs_mode"]
    assert check["items"] == 8 and check["over_tolerance"] == 0


# ---------------------------------------------------------------------------- which folder


def test_each_method_merges_into_the_folder_it_decodes_with(mode, tmp_path):
    """A run with a router merges into the ensemble model (mode-only too: the frozen base with its
    trained head); one without into the plain model; asking a method without a router for the
    ensemble is refused before training."""
    from safetensors import safe_open

    for loss, expected in (("mode-only", "mode"), ("layerwise", "llama")):
        out = tmp_path / loss
        code, _, err = mode(
            "train", "recipe=tiny-llama-alpaca", f"loss={loss}", "train.max_steps=1",
            "eval.answers=off", "eval.compare_base=false", f"output_dir={out}",
        )  # fmt: skip
        assert code == 0, err
        config = json.loads((out / "merged" / "config.json").read_text())
        assert config["model_type"] == expected
    with safe_open(str(tmp_path / "mode-only" / "merged" / "model.safetensors"), "pt") as weights:
        assert any(name.startswith("model.mode_head.") for name in weights.keys())  # noqa: SIM118
    code, _, err = mode(
        "train", "recipe=tiny-llama-alpaca", "loss=final-only", "merge.head=ensemble",
        f"output_dir={tmp_path / 'refused'}",
    )  # fmt: skip
    assert code == 2 and "merge.head=ensemble: loss=final-only has no MoDE head" in err
    assert not (tmp_path / "refused").exists()


def test_an_export_without_its_heads_weights_is_refused_by_mode(tiny_run, mode, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(tiny_run / "merged", broken)
    weights = load_file(str(broken / "model.safetensors"))
    kept = {k: v for k, v in weights.items() if not k.startswith("model.mode_head.router")}
    save_file(kept, str(broken / "model.safetensors"), metadata={"format": "pt"})
    code, _, err = mode("generate", f"checkpoint={broken}", "prompt=hi", "max_new_tokens=2")
    assert code == 2 and "does not hold the MoDE head its config.json describes" in err
    assert "Traceback" not in err
