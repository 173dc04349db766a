"""Decoding with the MoDE ensemble head: forward and generate() against a naive reference, the KV
cache against full recomputation, `mode generate` / `mode chat`, and the Python `load` API."""

from __future__ import annotations

import io

import pytest
import torch
import transformers
from helpers import naive_ensemble_logits

from mode_cli import files as files_mod
from mode_cli import options as options_mod
from mode_cli.decode import chat as chat_mod
from mode_cli.decode import ensemble as ensemble_mod
from mode_cli.decode import generate as generate_mod
from mode_cli.errors import ModeError
from mode_cli.mode.head import MoDEHead
from mode_cli.models import families as families_mod
from mode_cli.models.modeling_mode import MoDEForCausalLM

VOCAB = 61


def tiny_config(family: str):
    shape = {
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    if family == "llama":
        return transformers.LlamaConfig(**shape, num_key_value_heads=2)
    if family == "gemma2":
        # A low cap so the soft-capping visibly bends the logits.
        return transformers.Gemma2Config(
            **shape,
            num_key_value_heads=2,
            head_dim=8,
            query_pre_attn_scalar=8,
            sliding_window=4,
            final_logit_softcapping=2.0,
        )
    return transformers.GPTNeoXConfig(**shape)


def model_and_head(
    family: str, layers=(2, 3, 4), router: str = "token", train_final_norm: bool = False
):
    """A random-init model and a MoDE head whose norms and router are far from their init."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(family)).eval()
    head = MoDEHead(
        families_mod.final_norm(model),
        list(layers),
        4,
        32,
        router=router,
        train_final_norm=train_final_norm,
    )
    with torch.no_grad():
        for param in head.parameters():
            param.add_(0.5 * torch.randn_like(param))
    return model, head


def hooks_on_layers(model) -> int:
    """The MoDE hooks on the model's decoder layers (transformers keeps hooks of its own there)."""
    layers = families_mod.get_attr(model, families_mod.family_of(model).layers)
    return sum(
        getattr(hook, "func", None).__name__ == "_keep"
        for layer in layers
        for hook in layer._forward_hooks.values()
        if hasattr(hook, "func")
    )


@pytest.mark.parametrize(
    ("family", "train_final_norm"),
    [("llama", False), ("gemma2", False), ("gpt_neox", False), ("llama", True), ("gemma2", True)],
)
def test_ensemble_forward_matches_naive_reference(family, train_final_norm):
    model, head = model_and_head(family, train_final_norm=train_final_norm)
    ids = torch.randint(3, VOCAB, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    with torch.no_grad():
        own = model(input_ids=ids, attention_mask=mask).logits
        expected = naive_ensemble_logits(model, head, ids, mask)
        with ensemble_mod.use_head(model, "ensemble", head) as decoder:
            assert isinstance(decoder, MoDEForCausalLM)
            assert hooks_on_layers(model) == len(head.layers) - (not train_final_norm)
            # The decoder's modules are the model's own: nothing copied.
            assert decoder.lm_head is families_mod.lm_head(model)
            assert decoder.model.mode_head is head
            ensemble = decoder(input_ids=ids, attention_mask=mask).logits
            # The last position only, as generate() asks for it.
            last = decoder(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits
            # The model itself, called inside the block, is still the model: its own logits,
            # and the hooks keep nothing from a call that is not the wrapper's.
            inside = model(input_ids=ids, attention_mask=mask).logits
            assert decoder.model._states == {}
        after = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(ensemble, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last, expected[:, -1:], atol=1e-5, rtol=1e-5)
    assert (ensemble - own).abs().max() > 1e-2  # the ensemble is not the final layer
    torch.testing.assert_close(inside, own, atol=0, rtol=0)
    # Everything put back: no hook left on the layers, the same logits.
    assert hooks_on_layers(model) == 0
    torch.testing.assert_close(after, own, atol=0, rtol=0)


def test_final_head_is_the_model_itself():
    model, head = model_and_head("llama")
    ids = torch.randint(3, VOCAB, (1, 7))
    with torch.no_grad():
        own = model(input_ids=ids).logits
        decoder = ensemble_mod.wrap(model, head, "ensemble")
        with ensemble_mod.use_head(decoder, "final") as final_decoder:
            assert final_decoder is decoder
            final = decoder(input_ids=ids).logits
        mixed = decoder(input_ids=ids).logits
        ensemble_mod.unwrap(decoder)
    torch.testing.assert_close(final, own, atol=0, rtol=0)
    assert (mixed - own).abs().max() > 1e-2
    assert hooks_on_layers(model) == 0


def naive_greedy(
    model, head, prompt: list[int], steps: int
) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding by full recomputation of the naive reference at every step."""
    ids, logits = list(prompt), []
    for _ in range(steps):
        x = torch.tensor([ids])
        with torch.no_grad():
            step = naive_ensemble_logits(model, head, x, torch.ones_like(x))[0, -1]
        logits.append(step)
        ids.append(int(step.argmax()))
    return ids[len(prompt) :], logits


@pytest.mark.parametrize(
    ("family", "train_final_norm"), [("llama", False), ("gemma2", False), ("llama", True)]
)
def test_generate_with_kv_cache_matches_full_recomputation(family, train_final_norm):
    model, head = model_and_head(family, train_final_norm=train_final_norm)
    prompt = torch.randint(3, VOCAB, (1, 6))
    config = transformers.GenerationConfig(
        max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    expected_tokens, expected_logits = naive_greedy(model, head, prompt[0].tolist(), 8)
    with ensemble_mod.use_head(model, "ensemble", head) as decoder, torch.no_grad():
        outputs = {
            cache: decoder.generate(
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                generation_config=config,
                use_cache=cache,
                output_logits=True,
                return_dict_in_generate=True,
            )
            for cache in (True, False)
        }
    for out in outputs.values():
        assert out.sequences[0, 6:].tolist() == expected_tokens
        for got, want in zip(out.logits, expected_logits, strict=True):
            torch.testing.assert_close(got[0], want, atol=1e-5, rtol=1e-5)


class DigitTokenizer:
    """A stand-in tokenizer over a tiny vocabulary: each character one token, ids 3..60."""

    bos_token, eos_token, pad_token = "<s>", "</s>", "<pad>"
    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __call__(self, text: str, add_special_tokens: bool = True):
        ids = [3 + (ord(c) % (VOCAB - 3)) for c in text]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(f"<{i}>" for i in ids if not (skip_special_tokens and i < 3))


def test_generate_texts_batched_equals_one_by_one():
    """Left padding and batching change nothing: each prompt decodes as when alone, and both
    equal the naive greedy reference; generation stops at EOS."""
    model, head = model_and_head("llama")
    tokenizer = DigitTokenizer()
    prompts = ["12 + 30", "7", "a longer prompt here"]
    batched = generate_mod.generate_texts(
        model,
        head,
        tokenizer,
        prompts,
        formats="alpaca",
        max_new_tokens=6,
        device="cpu",
        batch_size=3,
    )
    single = [
        generate_mod.generate_texts(
            model, head, tokenizer, [p], formats="alpaca", max_new_tokens=6, device="cpu"
        )[0]
        for p in prompts
    ]
    assert batched == single
    for prompt, text in zip(prompts, batched, strict=True):
        tokens, _ = naive_greedy(model, head, tokenizer(prompt)["input_ids"], 6)
        if tokenizer.eos_token_id in tokens:
            tokens = tokens[: tokens.index(tokenizer.eos_token_id)]
        assert text == tokenizer.decode(tokens, skip_special_tokens=True)
    final = generate_mod.generate_texts(
        model,
        None,
        tokenizer,
        prompts,
        formats="alpaca",
        head_kind="final",
        max_new_tokens=6,
        device="cpu",
    )
    assert final != batched
    assert hooks_on_layers(model) == 0


def test_generate_texts_stops_at_any_of_the_stop_ids():
    """A reply ends at the first of `stops`, as transformers' generate() ends it: a token the
    greedy decoding reaches second stops every prompt's reply there."""
    model, head = model_and_head("llama")
    tokenizer = DigitTokenizer()
    prompts = ["12 + 30", "7"]
    for prompt in prompts:
        tokens, _ = naive_greedy(model, head, tokenizer(prompt)["input_ids"], 6)
        stop = tokens[1]
        expected = tokens[: tokens.index(stop)]
        got = generate_mod.generate_texts(
            model,
            head,
            tokenizer,
            [prompt],
            formats="alpaca",
            max_new_tokens=6,
            device="cpu",
            stops=[tokenizer.eos_token_id, stop],
        )
        assert got == [tokenizer.decode(expected, skip_special_tokens=True)]
    assert generate_mod.new_text(tokenizer, [5, 7, 2, 9]) == "<5><7>"
    assert generate_mod.new_text(tokenizer, [5, 7, 2, 9], [7, 2]) == "<5>"


def test_generate_texts_refuses_an_ensemble_without_a_head():
    model, _ = model_and_head("llama")
    with pytest.raises(ModeError, match="head=final"):
        generate_mod.generate_texts(
            model, None, DigitTokenizer(), ["1"], formats="alpaca", device="cpu"
        )
    _, norms_only = model_and_head("llama", router="none")
    with pytest.raises(ModeError, match="no router"):
        generate_mod.generate_texts(
            model, norms_only, DigitTokenizer(), ["1"], formats="alpaca", device="cpu"
        )


def test_decoding_options_report_every_problem():
    with pytest.raises(ModeError) as err:
        options_mod.decoding_options(
            ["head=middle", "max_new_tokens=x", "temperature=-1", "colour=red"], with_prompt=True
        )
    message = str(err.value)
    for part in ("head='middle'", "max_new_tokens='x'", "unknown option 'colour'", "prompt="):
        assert part in message
    options = options_mod.decoding_options(
        ["prompt=a=b", "head=final", "max_new_tokens=5", "temperature=0.5"], with_prompt=True
    )
    assert (options.prompt, options.head, options.max_new_tokens, options.temperature) == (
        "a=b",
        "final",
        5,
        0.5,
    )


# ---------------------------------------------------------------------------- on a trained run


@pytest.fixture(scope="module")
def final_only_run(tmp_path_factory, model_cache):
    from mode_cli.cli import main

    out = tmp_path_factory.mktemp("runs") / "final-only"
    code = main(
        [
            "train",
            "recipe=tiny-llama-alpaca",
            "loss=final-only",
            f"output_dir={out}",
            "train.max_steps=2",
            "merge=false",
        ]
    )
    assert code == 0
    return out


def test_generate_streams_an_answer(mode, tiny_run):
    code, out, err = mode(
        "generate", f"checkpoint={tiny_run}", "prompt=What is 12 + 30?", "max_new_tokens=12"
    )
    assert code == 0, err
    assert out.endswith("\n") and out.strip()
    assert "ensemble head" in err
    from mode_cli import load
    from mode_cli.api import format_prompt

    model, tokenizer = load(tiny_run, device="cpu")
    prompt = format_prompt(model, tokenizer, "What is 12 + 30?")
    assert "### Instruction:\nWhat is 12 + 30?" in prompt
    expected = generate_mod.generate_texts(
        model, None, tokenizer, [prompt], formats="alpaca", max_new_tokens=12, device="cpu"
    )[0]
    assert out == expected + "\n"
    code, final_out, err = mode(
        "generate", f"checkpoint={tiny_run}", "prompt=What is 12 + 30?", "head=final",
        "max_new_tokens=12",
    )  # fmt: skip
    assert code == 0, err
    expected_final = generate_mod.generate_texts(
        model,
        None,
        tokenizer,
        [prompt],
        formats="alpaca",
        head_kind="final",
        max_new_tokens=12,
        device="cpu",
    )[0]
    assert expected_final != expected
    assert final_out == expected_final + "\n"


def test_generate_from_the_merged_folder(mode, tiny_run):
    merged = tiny_run / "merged"
    code, out, err = mode(
        "generate", f"checkpoint={merged}", "prompt=What is 12 + 30?", "max_new_tokens=6"
    )
    assert code == 0, err
    assert out.strip()
    sampled = [
        mode("generate", f"checkpoint={merged}", "prompt=hi", "max_new_tokens=8", *options)[1]
        for options in (["temperature=1.0", "seed=3"],) * 2 + (["temperature=1.0", "seed=4"],)
    ]
    assert sampled[0] == sampled[1] != sampled[2]


def test_bad_checkpoints_give_one_clear_message(mode, tiny_run, tmp_path, final_only_run):
    code, _, err = mode("generate", f"checkpoint={tmp_path}", "prompt=hi")
    assert code == 2 and "is not a mode run folder" in err
    code, _, err = mode("generate", f"checkpoint={tmp_path / 'nowhere'}", "prompt=hi")
    assert code == 2 and "not found" in err
    code, _, err = mode("generate", f"checkpoint={tiny_run}")
    assert code == 2 and "prompt=" in err
    # A final-layer export whose MoDE head was left behind.
    bare = tmp_path / "merged"
    code, _, err = mode("export", f"checkpoint={tiny_run}", f"out={bare}", "head=final")
    assert code == 0, err
    for name in ("mode_head.json", "mode_head.safetensors"):
        (bare / name).unlink()
    code, _, err = mode("generate", f"checkpoint={bare}", "prompt=hi")
    assert code == 2 and "merged model without its MoDE head" in err
    # A final-only run has no ensemble; its final layer decodes.
    code, _, err = mode("generate", f"checkpoint={final_only_run}", "prompt=hi")
    assert code == 2 and "head=final" in err and "Traceback" not in err
    code, out, err = mode(
        "generate", f"checkpoint={final_only_run}", "prompt=hi", "head=final", "max_new_tokens=3"
    )
    assert code == 0, err


def test_chat_keeps_the_conversation(mode, tiny_run, monkeypatch):
    monkeypatch.setattr(
        "sys.stdin", io.StringIO("What is 2 + 2?\n\nAnd 3 + 3?\n/exit\nnever read\n")
    )
    seen = []
    original = chat_mod.chat_prompt

    def spy(messages, cfg, tokenizer):
        seen.append([dict(m) for m in messages])
        return original(messages, cfg, tokenizer)

    monkeypatch.setattr(chat_mod, "chat_prompt", spy)
    code, out, err = mode("chat", f"checkpoint={tiny_run}", "max_new_tokens=4")
    assert code == 0, err
    # Each prompt is rendered once to generate (and may be measured before, to fit the context).
    seen = [m for i, m in enumerate(seen) if i == 0 or m != seen[i - 1]]
    assert [len(m) for m in seen] == [1, 3]
    assert seen[1][0]["content"] == "What is 2 + 2?" and seen[1][1]["role"] == "assistant"
    assert seen[1][2]["content"] == "And 3 + 3?"
    # End of input ends the chat cleanly too.
    monkeypatch.setattr("sys.stdin", io.StringIO("hello"))
    code, _, err = mode("chat", f"checkpoint={tiny_run}", "max_new_tokens=2")
    assert code == 0, err


@pytest.mark.parametrize(
    ("document", "section"),
    [("README.md", "## Generating, and using"), ("docs/python-api.md", "## From Python")],
)
def test_readme_example_runs_as_written(tiny_run, capsys, document, section):
    """The five lines of the README (and of docs/python-api.md), on a tiny run: the ensemble's
    greedy answer."""
    from pathlib import Path

    doc = (Path(__file__).parents[1] / document).read_text()
    code = doc.split(section, 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert len([line for line in code.splitlines() if line.strip()]) == 5
    placeholder = '"outputs/smollm2-arithmetic/<time>"'
    assert placeholder in code
    namespace: dict = {}
    exec(code.replace(placeholder, repr(str(tiny_run))), namespace)
    printed = capsys.readouterr().out
    model, tokenizer = namespace["model"], namespace["tokenizer"]
    assert isinstance(model, MoDEForCausalLM) and model.model.ensemble
    from mode_cli.api import format_prompt

    prompt = format_prompt(model, tokenizer, "What is 12 + 30?")
    expected = generate_mod.generate_texts(
        model, None, tokenizer, [prompt], formats="alpaca", max_new_tokens=48, device="cpu"
    )[0]
    assert printed == expected + "\n"


def test_a_long_chat_drops_its_oldest_exchanges_to_fit_the_context():
    turns = []
    for i in range(4):
        turns += [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]
    turns.append({"role": "user", "content": "last"})

    def length(messages):  # ten tokens a message
        return 10 * len(messages)

    messages = list(turns)
    assert chat_mod.fit_context(messages, length, None) == 0 and messages == turns
    assert chat_mod.fit_context(messages, length, 50) == 4
    assert messages == turns[4:]  # whole exchanges dropped, oldest first
    assert chat_mod.fit_context(messages, length, 5) == 4 and messages == turns[-1:]


@pytest.mark.parametrize("data", ["chat-sample", "arithmetic-sample", "text-sample"])
def test_chat_prompt_follows_the_run_format(data):
    from transformers import AutoTokenizer

    from mode_cli.data import formats as formats_mod
    from mode_cli.recipes import compose_recipe

    cfg = compose_recipe("tiny-llama-alpaca", [f"data={data}"])
    tokenizer = AutoTokenizer.from_pretrained(
        str(files_mod.resolve_bundled("bundled:tiny-tokenizer"))
    )
    messages = [
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "The answer is 4."},
        {"role": "user", "content": "And 3 + 3?"},
    ]
    prompt = chat_mod.chat_prompt(messages, cfg, tokenizer)
    first = chat_mod.format_prompt("What is 2 + 2?", cfg, tokenizer)
    assert first == formats_mod.user_prompt("What is 2 + 2?", cfg.data, tokenizer)
    if cfg.data.format == "chat":
        template = formats_mod.chat_template(cfg.data, tokenizer)
        assert prompt == formats_mod.render_chat(messages, template, tokenizer, True)
        assert first == formats_mod.render_chat(messages[:1], template, tokenizer, True)
        positions = [prompt.index(m["content"]) for m in messages]
        assert positions == sorted(positions)
    elif cfg.data.format == "alpaca":
        second = chat_mod.format_prompt("And 3 + 3?", cfg, tokenizer)
        assert prompt == first + "The answer is 4.\n\n" + second
    else:
        assert prompt == "What is 2 + 2?\nThe answer is 4.\nAnd 3 + 3?\n"


# ---------------------------------------------------------------------------- prompt tokens


def bos_adding_tokenizer():
    """The bundled tiny tokenizer made to add a BOS token, with no chat template of its own: chat
    rows then render in the ChatML fallback, whose text does not start with the BOS token."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        str(files_mod.resolve_bundled("bundled:tiny-tokenizer"))
    )
    bos = tokenizer.bos_token
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tokenizer.bos_token_id)]
    )
    assert tokenizer("hi")["input_ids"][0] == tokenizer.bos_token_id
    assert getattr(tokenizer, "chat_template", None) is None
    return tokenizer


def prompt_recorder(tokenizer, data_format: str):
    """A tiny model whose `generate()` records the prompt ids it gets and answers EOS at once."""
    from omegaconf import OmegaConf

    model, _ = model_and_head("llama")
    model.mode_config = OmegaConf.create({"data": {"format": data_format}})
    model.prompts = []

    def generate(input_ids, attention_mask, **kwargs):
        for ids, mask in zip(input_ids, attention_mask, strict=True):
            model.prompts.append(ids[mask.bool()].tolist())
        return torch.cat([input_ids, torch.full_like(input_ids[:, :1], tokenizer.eos_token_id)], 1)

    model.generate = generate
    return model


@pytest.mark.parametrize("data_format", ["chat", "alpaca"])
def test_answers_generate_and_chat_tokenize_prompts_as_training_did(data_format, tmp_path):
    """One rule for every prompt: a rendered chat template carries its own special tokens, an
    Alpaca prompt gets the tokenizer's. With a BOS-adding tokenizer and the ChatML fallback, the
    answer-accuracy prompts once got a BOS that training never saw."""
    from helpers import data_cfg, write_jsonl
    from omegaconf import OmegaConf

    from mode_cli.data import formats as formats_mod
    from mode_cli.data.tokenizing import IGNORE, encode
    from mode_cli.eval import answers as answers_mod

    tokenizer = bos_adding_tokenizer()
    question, reply = "What is 2 + 2?", "The answer is 4."
    if data_format == "chat":
        row = {
            "messages": [
                {"role": "user", "content": question},
                {"role": "assistant", "content": reply},
            ]
        }
    else:
        row = {"instruction": question, "output": reply}
    data = data_cfg(train=str(write_jsonl(tmp_path / "rows.jsonl", [row])), format=data_format)
    row = formats_mod.Row(formats_mod.canonical(row, data_format, {}), data_format)
    template = formats_mod.chat_template(data, tokenizer)
    [example], _ = encode(row, tokenizer, 512, template)
    trained_from = next(i for i, label in enumerate(example.labels) if label != IGNORE)
    training_prompt = example.input_ids[:trained_from]

    # Answer accuracy: the row's prompt, tokenized for generation.
    model = prompt_recorder(tokenizer, data_format)
    cfg = OmegaConf.create({"data": data, "eval": {"max_new_tokens": 2, "answer_batch_size": 1}})
    prompts = answers_mod.answer_prompts(cfg, [row], tokenizer)
    answers_mod.decode_answers(cfg, model, None, tokenizer, "cpu", prompts, ["final"])
    # `mode generate` and `mode chat`: the user's message in the run's format, streamed.
    options = options_mod.DecodingOptions(prompt=question, head="final", max_new_tokens=2)
    generate_mod.stream_reply(
        model, tokenizer, chat_mod.format_prompt(question, model.mode_config, tokenizer), options
    )
    messages = [{"role": "user", "content": question}]
    generate_mod.stream_reply(
        model, tokenizer, chat_mod.chat_prompt(messages, model.mode_config, tokenizer), options
    )
    assert model.prompts == [training_prompt] * 3
    assert (training_prompt[0] == tokenizer.bos_token_id) is (data_format == "alpaca")
    # From Python: `prompt_inputs` of the same message.
    from mode_cli.api import prompt_inputs

    assert prompt_inputs(model, tokenizer, question)["input_ids"][0].tolist() == training_prompt


def chatml_tokenizer():
    """The bundled tiny tokenizer with ChatML's markers as special tokens and its own EOS: a chat
    reply ends with `<|im_end|>`, which is not the EOS (a Llama-3 base model tuned in its chat
    template: `<|eot_id|>` against `<|end_of_text|>`)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        str(files_mod.resolve_bundled("bundled:tiny-tokenizer"))
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    assert tokenizer.eos_token != "<|im_end|>"
    return tokenizer


def test_a_runs_stop_ids_end_its_replies_as_training_did(tmp_path):
    """Chat replies are trained to end with the template's end of turn, Alpaca responses and
    documents with the EOS: a run stops at the end of turn as soon as any of its rows are chats."""
    from helpers import data_cfg

    tokenizer = chatml_tokenizer()
    eos, im_end = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert generate_mod.run_stop_ids(data_cfg(train="x", format="chat"), tokenizer) == [
        eos,
        im_end,
    ]
    for data_format in ("alpaca", "text"):
        assert generate_mod.run_stop_ids(data_cfg(train="x", format=data_format), tokenizer) == [
            eos
        ]
    mixed = data_cfg(format="alpaca", mix=[{"train": "a"}, {"train": "b", "format": "chat"}])
    assert generate_mod.run_stop_ids(mixed, tokenizer) == [eos, im_end]
    config = generate_mod.generation_config(tokenizer, 4, stops=[eos, im_end])
    assert config.eos_token_id == [eos, im_end]
    assert generate_mod.generation_config(tokenizer, 4).eos_token_id == eos


def scripted_replier(tokenizer, reply: list[int], data_format: str):
    """A tiny model whose `generate()` answers `reply` after every prompt, ending it where
    transformers would: at the first id of the generation config's `eos_token_id`."""
    from omegaconf import OmegaConf

    model, _ = model_and_head("llama")
    model.mode_config = OmegaConf.create({"data": {"format": data_format}})

    def generate(input_ids, attention_mask, generation_config, **kwargs):
        stops = generation_config.eos_token_id
        stops = stops if isinstance(stops, list) else [stops]
        end = next((i + 1 for i, token in enumerate(reply) if token in stops), len(reply))
        answered = torch.tensor([reply[:end]] * len(input_ids), dtype=input_ids.dtype)
        return torch.cat([input_ids, answered], 1)

    model.generate = generate
    return model


@pytest.mark.parametrize("data_format", ["chat", "alpaca"])
def test_answers_generate_and_chat_end_a_reply_where_the_run_ends_them(data_format, tmp_path):
    """A chat run's reply ends at its template's end of turn in answer accuracy, `mode generate`
    and `mode chat`, not at the EOS that follows the next, untrained turn; an Alpaca run's
    replies run on to the EOS, the end of turn being no marker of theirs."""
    from helpers import data_cfg
    from omegaconf import OmegaConf

    from mode_cli.eval import answers as answers_mod

    tokenizer = chatml_tokenizer()
    eos, im_end = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")
    four = tokenizer("4", add_special_tokens=False)["input_ids"]
    again = tokenizer(" user asks again", add_special_tokens=False)["input_ids"]
    model = scripted_replier(tokenizer, four + [im_end] + again + [eos], data_format)
    expected = "4" if data_format == "chat" else tokenizer.decode(four + again)
    data = data_cfg(train="x", format=data_format)
    cfg = OmegaConf.create({"data": data, "eval": {"max_new_tokens": 8, "answer_batch_size": 1}})
    row = (
        {"messages": [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"}]}
        if data_format == "chat"
        else {"instruction": "2 + 2?", "output": "4"}
    )
    prompts = answers_mod.answer_prompts(cfg, [row], tokenizer)
    got = answers_mod.decode_answers(cfg, model, None, tokenizer, "cpu", prompts, ["final"])
    assert [text.strip() for text in got["final"]] == [expected.strip()]
    model.mode_config = cfg
    options = options_mod.DecodingOptions(prompt="2 + 2?", head="final", max_new_tokens=8)
    prompt = chat_mod.format_prompt("2 + 2?", cfg, tokenizer)
    assert generate_mod.stream_reply(model, tokenizer, prompt, options).strip() == expected.strip()
    messages = [{"role": "user", "content": "2 + 2?"}]
    prompt = chat_mod.chat_prompt(messages, cfg, tokenizer)
    assert generate_mod.stream_reply(model, tokenizer, prompt, options).strip() == expected.strip()
