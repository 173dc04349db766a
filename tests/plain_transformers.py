"""What plain transformers does with exported model folders, in an interpreter where `mode_cli`
cannot be imported: `python tests/plain_transformers.py JOB.json`.

The job (written by tests/test_export.py) lists folders and what to do with each; the results go
to the job's `output` (torch.save). Nothing of mode's is on the import path the models load from:
a finder refuses every `mode_cli` import, so a folder's code must stand alone.
"""

from __future__ import annotations

import importlib.abc
import json
import sys


class RefuseModeCli(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "mode_cli" or name.startswith("mode_cli."):
            raise ModuleNotFoundError(f"No module named {name!r} (kept out of this interpreter)")
        return None


sys.meta_path.insert(0, RefuseModeCli())

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline  # noqa: E402


def plain_load_error(path: str) -> str:
    """What a load without trust_remote_code says (it must refuse)."""
    try:
        AutoModelForCausalLM.from_pretrained(path)
    except Exception as err:  # transformers raises ValueError with its own message
        return f"{type(err).__name__}: {err}"
    return ""


def generate(model, ids: list[int], **kwargs) -> list[int]:
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs
        )
    return out[0, len(ids) :].tolist()


def run(item: dict) -> dict:
    path = item["path"]
    dtype = getattr(torch, item.get("dtype", "float32"))
    result: dict = {"plain_load_error": plain_load_error(path)}
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=dtype).eval()
    result["class"] = type(model).__name__
    result["model_type"] = model.config.model_type
    inputs = torch.load(item["inputs"]) if item.get("inputs") else None
    if inputs is not None:
        with torch.no_grad():
            result["logits"] = model(**inputs).logits.float()
    prompts = item.get("prompts", [])
    steps = item.get("max_new_tokens", 8)
    result["greedy"] = [
        generate(model, ids, do_sample=False, max_new_tokens=steps) for ids in prompts
    ]
    if prompts:
        result["greedy_no_cache"] = generate(
            model, prompts[0], do_sample=False, max_new_tokens=steps, use_cache=False
        )
    if "sample_seed" in item:
        torch.manual_seed(item["sample_seed"])
        result["sampled"] = generate(
            model,
            prompts[0],
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=steps,
        )
    if item.get("device_map") and inputs is not None:
        mapped = AutoModelForCausalLM.from_pretrained(
            path, trust_remote_code=True, device_map="auto", dtype=dtype
        ).eval()
        with torch.no_grad():
            result["device_map_logits"] = mapped(**inputs).logits.float()
    if "chat" in item:
        tokenizer = AutoTokenizer.from_pretrained(path)
        chat = tokenizer.apply_chat_template(
            item["chat"], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        with torch.no_grad():
            out = model.generate(**chat, max_new_tokens=item["chat_max_new_tokens"])
        result["chat_reply"] = out[0, chat["input_ids"].shape[1] :].tolist()
        result["eos_token_id"] = model.generation_config.eos_token_id
    if item.get("pipeline"):
        generator = pipeline("text-generation", model=path, trust_remote_code=True)
        messages = [{"role": "user", "content": "What is 2 + 2?"}]
        reply = generator(messages, max_new_tokens=steps, do_sample=False)
        result["pipeline_reply"] = reply[0]["generated_text"][-1]["content"]
    result["mode_cli_imported"] = any(name.startswith("mode_cli") for name in sys.modules)
    return result


def main(job_path: str) -> None:
    with open(job_path) as handle:
        job = json.load(handle)
    torch.set_num_threads(job.get("threads", 1))
    try:
        import mode_cli  # noqa: F401
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit("mode_cli is importable here: the check would prove nothing")
    torch.save({item["path"]: run(item) for item in job["exports"]}, job["output"])


if __name__ == "__main__":
    main(sys.argv[1])
