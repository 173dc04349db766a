"""The GPU acceptance of `mode` in one call: CUDA tests, a tiny recipe end to end on CUDA, and the
24 GB recipe's memory and speed at Llama-3-8B's shape.

    python scripts/gpu_check.py --plan      # anywhere: what it runs, and how to carry the wheels
    python scripts/gpu_check.py             # on a machine with a CUDA GPU (or: make gpu-check)
    python3 scripts/gpu_check.py --wheels .whl --out "$OUT"   # a bare GPU machine, wheels carried

Parts, each timed; a part that fails is recorded and the next one still runs:

a. `pytest -m gpu`: bitsandbytes' CUDA 4-bit kernels, bf16, paged 8-bit AdamW state through a
   checkpoint and resume, the CUDA RNG restored, a real CUDA out-of-memory message.
b. A tiny recipe end to end on CUDA in bf16 with paged 8-bit AdamW: train (stopped after 2 steps),
   resume (to the end, merging), eval and generate from the run and from its merged folder; each
   the real CLI in a process of its own.
c. A Llama-3-8B-shaped random-init model (speed and memory do not depend on weight values) at the
   settings of `train=gpu-24gb` (NF4 double-quant, bf16, LoRA r16 all-linear, gradient
   checkpointing, paged 8-bit AdamW), a batch of 4 x 2,048 tokens: peak CUDA memory and tokens/s
   of `loss=final-only`, `loss=mode` and a plain transformers + peft step with the model's own
   loss, on the same batch, in the same process.
d. FSDP2 under torchrun on every GPU of the machine (one GPU still runs the sharded code): a tiny
   recipe in bf16 over NCCL, its tokens/s and peak CUDA memory per GPU (rank 0's), and a
   checkpoint written from the shards that one process then resumes. Then paged 8-bit AdamW with
   `distributed.strategy=fsdp`: `distributed.nproc=1` (one plain process, nothing sharded) trains;
   a torchrun job, whose parameters FSDP2 shards, is refused before loading (exit 2, the message
   naming the alternatives), and the alternative, DDP with paged 8-bit AdamW on every GPU, trains.
e. The flagship recipe itself, `mode train recipe=llama3-8b-alpaca` with its `train=gpu-24gb`
   settings (cuda, bf16, paged 8-bit AdamW, gradient checkpointing, 4 x 4 micro-batches), on a
   random-init model with Llama-3-8B's layer shape (4 of its 32 layers, the bundled tokenizer)
   and the bundled arithmetic data: 1 step, then resumed to step 2 and merged; each the real CLI.
   Its start line must say `device cuda:0, paged_adamw_8bit, bf16 autocast`.
f. Engines on a MoDE ensemble export (a tiny model with a trained-like head): plain transformers
   on CUDA (`trust_remote_code=True`, `device_map="auto"`) decodes mode's greedy tokens; and, when
   `vllm` is importable, vLLM's Transformers backend (`model_impl="transformers"`) decodes the same
   tokens as transformers. Without vllm the vLLM step is skipped and the record says why.
g. The memory plan (`mode plan`) against the same 8B-shaped model: the plan's peak, less the
   CUDA context, against `torch.cuda.max_memory_reserved`, and less the allocator slack too,
   against `max_memory_allocated`, for `loss=mode` at two sequence lengths and two
   micro-batches (goal: within 10%; reported, not failed: the CUDA constants are being
   calibrated).

It writes a JSON record (`--json`, also copied into `--out`) and its table into docs/benchmarks.md
(also copied into `--out`: on a lent machine only `$OUT` comes back), and exits 1 when a part fails,
a recipe step's peak exceeds 24 GB (10^9 bytes; the peak reserved by PyTorch's allocator, the
CUDA context comes on top), or MoDE's peak exceeds 1.05x final-only's.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent
for path in (ROOT, SCRIPTS):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from benchdoc import DOC, cpu_model, write_section  # noqa: E402

LIMIT_BYTES = 24 * 10**9
PEAK_RATIO = 1.05  # MoDE's peak over final-only's on the same batch
GIB = 2**30
# The GPU machine lacks these (ENVIRONMENT.md, "GPU machine"); they travel as wheels, built for its
# Python 3.12, with the tested transformers and peft (its own are older; pure Python). Its CUDA
# torch stays. antlr4-python3-runtime exists only as an sdist (pure Python). About 60 MB in all:
# with the repository, under the 64 MiB a device call carries.
WHEELS = [
    "bitsandbytes==0.50.2",
    "transformers==5.24.0",
    "peft==0.21.2",
    "hydra-core==1.3.8",
    "omegaconf==2.3.1",
    "datasets==5.2.0",
    "dill==0.4.1",
    "multiprocess==0.70.19",
]
SDISTS = ["antlr4-python3-runtime==4.9.3"]
PLATFORMS = ["manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
SITE = "/tmp/site"

# Llama-3-8B's shape (meta-llama/Meta-Llama-3-8B config.json).
SHAPES = {
    "llama3-8b": {
        "vocab_size": 128_256,
        "hidden_size": 4096,
        "intermediate_size": 14_336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 8192,
        "rope_theta": 500_000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    },
    "tiny": {
        "vocab_size": 1000,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "tie_word_embeddings": False,
    },
}
SHAPE_TITLES = {"llama3-8b": "Llama-3-8B's", "tiny": "a tiny (rehearsal)"}
VARIANTS = ("plain", "final-only", "mode")  # plain: transformers + peft, the model's own loss
RECIPE_VARIANTS = ("final-only", "mode")  # the recipe's own steps, held to the limit
# Part g: (sequence length, micro-batch) of each comparison of the plan with a measured step.
PLAN_GRID = ((1024, 2), (1024, 4), (2048, 2), (2048, 4))
PLAN_GOAL = 0.10
PYTEST_TIMEOUT_S = 240
E2E_TIMEOUT_S = 180


def download_command() -> str:
    """The commands that fetch the wheels (into `.whl/`, to be named in the run's `carry`)."""
    common = "python3 -m pip download --no-deps -d .whl"
    platforms = " ".join(f"--platform {p}" for p in PLATFORMS)
    binary = f"{common} --only-binary=:all: --python-version 3.12 --implementation cp {platforms}"
    return "\n".join(
        [
            'echo /.whl/ >> "$(git rev-parse --git-common-dir)/info/exclude"',
            f"{binary} {' '.join(WHEELS)}",
            f"{common} --no-binary=:all: {' '.join(SDISTS)}",
        ]
    )


def plan(args) -> str:
    """What a run does, and how to run it on a lent GPU machine."""
    shape = SHAPES[args.shape]
    return f"""\
scripts/gpu_check.py: the GPU acceptance of mode in one call (estimated at about 10 minutes on
one large GPU, part c about 3 of them; no GPU has run it yet, so nothing here is timed).

a. pytest -m gpu (tests/test_gpu.py): CUDA 4-bit kernels, bf16, paged 8-bit AdamW state through
   checkpoint and resume, CUDA RNG restore, a real CUDA out-of-memory message.
   {" ".join(pytest_command())}
b. tiny-llama-alpaca end to end on CUDA, bf16, paged 8-bit AdamW (each its own process):
{chr(10).join("   python -m mode_cli " + shlex.join(c) for c in e2e_commands(Path("RUN")))}
c. {args.shape}-shaped random-init model ({shape["num_hidden_layers"]} layers, hidden \
{shape["hidden_size"]}, vocab {shape["vocab_size"]:,}) at train=gpu-24gb's settings,
   batch {args.micro_batch or "train.micro_batch_size"} x {args.seq_len or "data.max_seq_len"}: \
{", ".join(VARIANTS)}; {args.steps} timed steps each after a warm-up.
   Fails if final-only's or mode's peak reserved CUDA memory exceeds {LIMIT_BYTES / 1e9:.0f} GB,
   or mode's peak exceeds {PEAK_RATIO}x final-only's.
d. FSDP2 under torchrun on every GPU (one still runs the sharded code), then one process resuming:
{chr(10).join("   " + shlex.join(c) for c in fsdp_commands(Path("RUN"), 1))}
   then paged 8-bit AdamW with FSDP: one process (trains), torchrun (refused, exit 2), and DDP
   on every GPU instead (trains):
{chr(10).join(f"   {shlex.join(c.command)}  # exit {c.exit}" for c in optimizer_checks(Path("RUN"), 1))}
e. the flagship recipe (train=gpu-24gb) on a random-init model of Llama-3-8B's layer shape:
{chr(10).join("   python -m mode_cli " + shlex.join(c) for c in flagship_commands(Path("RUN")))}
f. a tiny MoDE ensemble export in plain transformers on CUDA (device_map="auto") against mode's
   greedy tokens, and in vLLM's Transformers backend when vllm is importable (skipped otherwise:
   its wheels are far over what a device call carries).
g. the memory plan against the measured peaks of the same model, loss=mode, at (sequence length,
   micro-batch) {", ".join(f"({length}, {batch})" for length, batch in PLAN_GRID)}
   (goal: within {PLAN_GOAL:.0%} of torch.cuda.max_memory_allocated and max_memory_reserved).
Writes: {args.json} and its section of {args.doc}; with --out DIR, copies of both into DIR.

On a lent GPU machine (bitsandbytes, hydra-core, omegaconf, antlr4 and datasets are not there;
its transformers and peft are older than the tested ones, which travel too):
1. here, in the repository root, fetch the wheels (about 60 MB; the repository adds about 4):
{download_command()}
2. two device calls (a command may run 10 minutes), carrying them (each installs them into
   {SITE} first): parts a, b, d, e and f, then parts c and g (the 8B shape) added to the first
   call's record:
   run(command='python3 scripts/gpu_check.py --wheels .whl --skip shape --skip plan --out "$OUT"',
       carry=[".whl"], timeout_s=600)
   copy $OUT's gpu_check.json into the repository root as gpu_check.part.json (it travels), then
   run(command='python3 scripts/gpu_check.py --wheels .whl --skip pytest --skip e2e --skip fsdp
       --skip flagship --skip engines --add-to gpu_check.part.json --out "$OUT"', carry=[".whl"],
       timeout_s=600)
3. copy $OUT's gpu_check.json to docs/ and its benchmarks.md section into docs/benchmarks.md
   (or: python scripts/gpu_check.py --from-json FILE), and commit the figures.
"""


# ---------------------------------------------------------------------------- setup


def install_wheels(folder: Path) -> None:
    """Install carried wheels and sdists into SITE (no index, no dependencies), then run this
    script again with SITE on the path."""
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps"]
    pip += ["--no-cache-dir", "--upgrade", "--target", SITE]
    wheels = sorted(str(p) for p in folder.glob("*.whl"))
    sdists = sorted(str(p) for p in folder.glob("*.tar.gz"))
    if wheels:
        subprocess.run([*pip, "--no-compile", *wheels], check=True)
    if sdists:
        subprocess.run([*pip, "--no-build-isolation", *sdists], check=True)
    argv = [a for a in sys.argv[1:] if a != "--wheels" and a != str(folder)]
    argv = [a for a in argv if not a.startswith("--wheels=")]
    env = child_env({"PYTHONPATH": os.pathsep.join([SITE, str(ROOT)])})
    os.execve(sys.executable, [sys.executable, __file__, *argv], env)


def child_env(extra: dict | None = None) -> dict:
    """The environment of the processes this script starts: offline, the repository importable."""
    env = dict(os.environ)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(ROOT) not in paths:
        paths.append(str(ROOT))
    env.update(
        {
            "PYTHONPATH": os.pathsep.join(paths),
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra or {})
    return env


def cuda(device: str) -> bool:
    """Whether `device` is a GPU, as mode decides it (mode_cli/devices.py; imports torch)."""
    from mode_cli.devices import is_cuda

    return is_cuda(device)


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "hydra-core"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "missing"
    return found


def run_process(
    cmd: list[str], timeout: float, env: dict, cwd: Path = ROOT, look_for: str = ""
) -> dict:
    """A command in its own session (its whole group killed on timeout): exit code, seconds, the
    tail of its output, and whether the whole output holds `look_for` (`found`; whitespace and
    line breaks count as one space)."""
    start = time.perf_counter()
    process = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = process.communicate(timeout=timeout)
        code = process.returncode
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        output, _ = process.communicate()
        code = "timeout"
    return {
        "command": shlex.join(cmd),
        "exit": code,
        "seconds": round(time.perf_counter() - start, 1),
        "tail": output[-2000:],
        "found": " ".join(look_for.split()) in " ".join(output.split()),
    }


# ---------------------------------------------------------------------------- a. pytest -m gpu


def pytest_command() -> list[str]:
    # The CUDA-only tests live in one file: collecting the whole suite would import what a bare
    # GPU machine lacks (lm-eval, for one).
    return [
        sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
        "tests/test_gpu.py",
    ]  # fmt: skip


def run_pytest(cache: Path) -> dict:
    result = run_process(pytest_command(), PYTEST_TIMEOUT_S, child_env({"MODE_CACHE": str(cache)}))
    summary = re.findall(r"(\d+) (passed|failed|skipped|error)", result["tail"])
    result["counts"] = {kind: int(n) for n, kind in summary}
    result["ok"] = result["exit"] == 0 and result["counts"].get("passed", 0) > 0
    return result


# ---------------------------------------------------------------------------- b. end to end


# A tiny recipe at the 24 GB recipe's device settings.
TINY_ON_CUDA = [
    "recipe=tiny-llama-alpaca",
    "train.device=cuda",
    "train.precision=bf16",
    "train.optimizer=paged_adamw_8bit",
]


def e2e_commands(run: Path) -> list[list[str]]:
    """`mode` invocations of a tiny recipe on CUDA: train, resume, eval and generate."""
    train = [
        "train",
        *TINY_ON_CUDA,
        "train.max_steps=4",
        "checkpoint.every_steps=1",
        "eval.max_examples=4",
        f"output_dir={run}",
    ]
    decode = ["eval.answer_examples=4", "eval.max_new_tokens=8", "eval.max_examples=4"]
    return [
        [*train, "train.stop_after_steps=2"],
        [*train, "resume=auto"],
        ["eval", f"checkpoint={run}", *decode],
        ["eval", f"checkpoint={run / 'merged'}", *decode],
        ["generate", f"checkpoint={run}", "prompt=What is 2 + 3?", "max_new_tokens=8"],
        ["generate", f"checkpoint={run / 'merged'}", "prompt=What is 2 + 3?", "max_new_tokens=8"],
    ]


def fsdp_commands(run: Path, gpus: int) -> list[list[str]]:
    """FSDP2 on `gpus` GPUs under torchrun (stopped after 4 steps with a checkpoint), then one
    process resuming from that checkpoint to the end."""
    train = [
        "recipe=tiny-llama-alpaca",
        "train.device=cuda",
        "train.precision=bf16",
        "train.max_steps=8",
        "train.micro_batch_size=2",
        "eval.max_examples=4",
        "merge=false",
        f"output_dir={run}",
    ]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return [
        [
            *torchrun,
            f"--nproc_per_node={gpus}",
            "-m",
            "mode_cli",
            "train",
            *train,
            "distributed.strategy=fsdp",
            "train.stop_after_steps=4",
        ],
        # The global micro-batch stays 2 x gpus; the checkpoint's format is one process's.
        [
            sys.executable,
            "-m",
            "mode_cli",
            "train",
            *[a for a in train if not a.startswith("train.micro_batch_size")],
            f"train.micro_batch_size={2 * gpus}",
            "resume=auto",
        ],
    ]


class Check(NamedTuple):
    """A command and how it must end: its exit code, and text its output must hold."""

    command: list[str]
    exit: int
    says: str = ""


# What `mode train` says when it refuses an 8-bit optimizer on FSDP's shards (mode_cli/train/optim.py).
FSDP_8BIT_REFUSAL = "cannot update the parameters distributed.strategy=fsdp shards"


def optimizer_checks(run: Path, gpus: int) -> list[Check]:
    """Paged 8-bit AdamW with FSDP: one process trains (nothing to shard), a torchrun job is
    refused before it loads anything, and DDP on every GPU, the alternative it names, trains."""
    train = ["train", *TINY_ON_CUDA, "train.max_steps=2", "eval.max_examples=4", "merge=false"]
    fsdp = [*train, "distributed.strategy=fsdp"]
    mode = [sys.executable, "-m", "mode_cli"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return [
        Check([*mode, *fsdp, "distributed.nproc=1", f"output_dir={run / 'one'}"], 0),
        Check(
            [*torchrun, "--nproc_per_node=1", "-m", "mode_cli", *fsdp, f"output_dir={run / 'no'}"],
            2,
            FSDP_8BIT_REFUSAL,
        ),
        Check(
            [
                *torchrun,
                f"--nproc_per_node={gpus}",
                "-m",
                "mode_cli",
                *train,
                "distributed.strategy=ddp",
                f"output_dir={run / 'ddp'}",
            ],
            0,
        ),
    ]


def run_checks(checks: list[Check], env: dict) -> list[dict]:
    """Each check's command, with whether it ended as it must (`as_expected`)."""
    results = []
    for check in checks:
        result = run_process(check.command, E2E_TIMEOUT_S, env, look_for=check.says)
        result["as_expected"] = result["exit"] == check.exit and result["found"]
        results.append(result)
    return results


def run_fsdp(work: Path, cache: Path) -> dict:
    import torch

    gpus = torch.cuda.device_count()
    run = work / "fsdp"
    env = child_env({"MODE_CACHE": str(cache)})
    steps = []
    for cmd in fsdp_commands(run, gpus):
        steps.append(run_process(cmd, E2E_TIMEOUT_S, env))
        if steps[-1]["exit"] != 0:
            break
    logged = logged_steps(run)
    sharded = [r for r in logged if r["step"] <= 4]
    ok = all(s["exit"] == 0 for s in steps) and len(steps) == 2
    ok = ok and sorted(r["step"] for r in logged) == list(range(1, 9))
    optimizer = run_checks(optimizer_checks(work / "fsdp-8bit", gpus), env)
    return {
        "ok": ok and all(c["as_expected"] for c in optimizer),
        "gpus": gpus,
        "steps": steps,
        "optimizer_checks": optimizer,
        "tokens_per_s": sharded[-1]["tokens_per_s"] if sharded else None,
        "peak_memory_gb": sharded[-1].get("peak_memory_gb") if sharded else None,
    }


# Llama-3-8B's decoder layer (hidden 4096, MLP 14,336, 32 query and 8 KV heads), 4 of its 32
# layers, the bundled tokenizer's vocabulary: the recipe's own path at the real layer width.
FLAGSHIP_MODEL = [
    "model=tiny-llama",
    "model.tiny.hidden_size=4096",
    "model.tiny.intermediate_size=14336",
    "model.tiny.num_layers=4",
    "model.tiny.num_heads=32",
    "model.tiny.num_kv_heads=8",
]
FLAGSHIP_START = "device cuda:0, paged_adamw_8bit, bf16 autocast"


def flagship_commands(run: Path) -> list[list[str]]:
    """`mode train recipe=llama3-8b-alpaca` as shipped but for the model and the data: one step,
    then resumed to the second and merged."""
    train = [
        "train",
        "recipe=llama3-8b-alpaca",
        *FLAGSHIP_MODEL,
        "data=arithmetic-sample",
        "train.max_steps=2",
        "checkpoint.every_steps=1",
        "eval.max_examples=4",
        "eval.compare_base=false",
        f"output_dir={run}",
    ]
    return [[*train, "train.stop_after_steps=1"], [*train, "resume=auto"]]


def run_flagship(work: Path, cache: Path) -> dict:
    env = child_env({"MODE_CACHE": str(cache)})
    run = work / "flagship"
    steps = []
    for args in flagship_commands(run):
        command = [sys.executable, "-m", "mode_cli", *args]
        steps.append(run_process(command, E2E_TIMEOUT_S, env, look_for=FLAGSHIP_START))
        if steps[-1]["exit"] != 0:
            break
    logged = logged_steps(run)
    ok = len(steps) == 2 and all(s["exit"] == 0 and s["found"] for s in steps)
    ok = ok and len(logged) == 2 and (run / "merged").is_dir()
    return {
        "ok": ok,
        "steps": steps,
        "losses": [r["loss"] for r in logged],
        "peak_memory_gb": max((r.get("peak_memory_gb") or 0 for r in logged), default=None),
    }


def logged_steps(run: Path) -> list[dict]:
    """The step records (those with a loss) of a run's metrics.jsonl; none without the file."""
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        return []
    return [r for r in map(json.loads, metrics.read_text().splitlines()) if "loss" in r]


def run_e2e(work: Path, cache: Path) -> dict:
    env = child_env({"MODE_CACHE": str(cache)})
    steps = []
    for args in e2e_commands(work / "run"):
        result = run_process([sys.executable, "-m", "mode_cli", *args], E2E_TIMEOUT_S, env)
        steps.append(result)
        if result["exit"] != 0:
            break
    losses = [r["loss"] for r in logged_steps(work / "run")]
    ok = len(steps) == len(e2e_commands(work / "run")) and all(s["exit"] == 0 for s in steps)
    ok = ok and len(losses) == 4 and (work / "run" / "merged").is_dir()
    return {"ok": ok, "steps": steps, "losses": losses}


# ---------------------------------------------------------------------------- e. engines

ENGINE_TIMEOUT_S = 300
ENGINE_PROMPTS = ["What is 12 + 30?", "Name three colours.", "Count from 1 to 5:"]
ENGINE_TOKENS = 12
# vLLM's kernels are not transformers': its prompt log-probabilities must agree within this (fp32),
# its greedy tokens are reported (a near-tie of a random model may break either way).
VLLM_TOLERANCE = 1e-3
# Run in a process of its own (vLLM starts workers and takes the GPU): transformers' greedy tokens
# and prompt log-probabilities on the export, then vLLM's through its Transformers backend when
# vllm is importable.
ENGINE_SCRIPT = """
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, device, prompts, steps = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
tokenizer = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(
    folder, trust_remote_code=True, dtype=torch.float32,
    device_map="auto" if torch.device(device).type == "cuda" else None,
).eval()
record = {"class": type(model).__name__, "transformers": [], "transformers_logprobs": []}
for text in prompts:
    ids = tokenizer(text, return_tensors="pt").to(model.device)
    with torch.no_grad():
        out = model.generate(**ids, do_sample=False, max_new_tokens=steps, min_new_tokens=steps)
        logprobs = torch.log_softmax(model(**ids).logits[0].float(), -1)
    record["transformers"].append(out[0, ids["input_ids"].shape[1]:].tolist())
    tokens = ids["input_ids"][0].tolist()
    record["transformers_logprobs"].append(
        [logprobs[i - 1, tokens[i]].item() for i in range(1, len(tokens))]
    )
try:
    import vllm
except ImportError as err:
    record["vllm_skipped"] = f"vllm is not importable ({err})"
else:
    del model
    torch.cuda.empty_cache()
    llm = vllm.LLM(
        model=folder, model_impl="transformers", trust_remote_code=True, dtype="float32",
        gpu_memory_utilization=0.3, max_model_len=256,
    )
    record["vllm_class"] = llm.apply_model(lambda m: type(m).__name__)[0]
    params = vllm.SamplingParams(
        temperature=0.0, max_tokens=steps, min_tokens=steps, prompt_logprobs=0
    )
    outputs = llm.generate(prompts, params)
    record["vllm"] = [list(o.outputs[0].token_ids) for o in outputs]
    record["vllm_logprobs"] = [
        [entry[token].logprob for entry, token in zip(o.prompt_logprobs[1:], o.prompt_token_ids[1:])]
        for o in outputs
    ]
print("ENGINES " + json.dumps(record))
"""


def tiny_export(folder: Path, cache: Path) -> Path:
    """A MoDE ensemble export of the tiny Llama with a head away from its start (a trained head
    is), written as `mode export` writes it."""
    import torch

    os.environ["MODE_CACHE"] = str(cache)
    from mode_cli.export.command import write
    from mode_cli.mode.head import MoDEHead
    from mode_cli.models import families
    from mode_cli.models.loading import load_base_model, load_tokenizer, resolve_source
    from mode_cli.recipes import compose_recipe

    cfg = compose_recipe("tiny-llama-alpaca", [])
    source = resolve_source(cfg.model)
    cfg.model.quantization = "none"
    model = load_base_model(source, cfg.model, "fp32", "cpu")
    torch.manual_seed(0)
    head = MoDEHead(families.final_norm(model), [2, 3, 4], 4, cfg.model.tiny.hidden_size)
    with torch.no_grad():
        for param in head.parameters():
            param.add_(0.3 * torch.randn_like(param))
    return write(folder, cfg, model, head, load_tokenizer(source, cfg.model), "ensemble", None)


def mode_tokens(folder: Path, prompts: list[str], steps: int, device: str) -> list[list[int]]:
    """mode's own greedy tokens on the export (`mode_cli.load` of the folder, the ensemble), on the
    device transformers decodes on (the same kernels)."""
    import torch

    from mode_cli import load

    model, tokenizer = load(folder, device=device)
    tokens = []
    for text in prompts:
        ids = tokenizer(text, return_tensors="pt").to(device)
        with torch.no_grad():
            out = model.generate(**ids, do_sample=False, max_new_tokens=steps, min_new_tokens=steps)
        tokens.append(out[0, ids["input_ids"].shape[1] :].tolist())
    del model
    free_memory(device)
    return tokens


def largest_difference(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for xs, ys in zip(a, b, strict=True) for x, y in zip(xs, ys, strict=True))


def run_engines(work: Path, cache: Path, device: str = "cuda") -> dict:
    """f. transformers (and vLLM when importable) on an ensemble export, against mode."""
    folder = tiny_export(work / "engine-export", cache)
    expected = mode_tokens(folder, ENGINE_PROMPTS, ENGINE_TOKENS, device)
    cmd = [
        sys.executable, "-c", ENGINE_SCRIPT, str(folder), device, json.dumps(ENGINE_PROMPTS),
        str(ENGINE_TOKENS),
    ]  # fmt: skip
    result = run_process(cmd, ENGINE_TIMEOUT_S, child_env({"MODE_CACHE": str(cache)}))
    line = next((x for x in result["tail"].splitlines() if x.startswith("ENGINES ")), None)
    found = json.loads(line.removeprefix("ENGINES ")) if line else {}
    result.update(found)
    result["transformers_matches_mode"] = found.get("transformers") == expected
    if "vllm" in found:
        difference = largest_difference(found["vllm_logprobs"], found["transformers_logprobs"])
        result["vllm_logprob_difference"] = difference
        result["vllm_matches_transformers"] = difference <= VLLM_TOLERANCE
        result["vllm_same_tokens"] = found["vllm"] == found["transformers"]
    result["ok"] = (
        result["exit"] == 0
        and result["transformers_matches_mode"]
        and result.get("vllm_matches_transformers", True)
    )
    return result


# ---------------------------------------------------------------------------- c. the 8B shape


def recipe_config(variant: str, device: str, overrides: list[str]):
    """llama3-8b-alpaca (train=gpu-24gb) with the variant's loss, on `device`."""
    from mode_cli.config import validate
    from mode_cli.recipes import compose_recipe

    loss = "final-only" if variant == "plain" else variant
    cfg = compose_recipe("llama3-8b-alpaca", [f"loss={loss}", f"train.device={device}", *overrides])
    validate(cfg)
    return cfg


def build_model(cfg, shape: dict, device: str, folder: Path):
    """A random-init model of `shape`, saved, then loaded as the recipe loads a base (NF4, the
    compute dtype) with its LoRA adapter attached."""
    import torch
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM, LlamaConfig

    from mode_cli.models.loading import attach_adapter, compute_dtype, load_base_model

    torch.manual_seed(0)
    with torch.device(device):
        dtype = compute_dtype(cfg.train.precision)
        model = AutoModelForCausalLM.from_config(LlamaConfig(**shape), dtype=dtype)
    model.save_pretrained(folder)
    del model
    free_memory(device)
    model_cfg = OmegaConf.merge(cfg.model, {"name_or_path": str(folder), "revision": None})
    base = load_base_model(str(folder), model_cfg, cfg.train.precision, device)
    return attach_adapter(base, cfg.adapter, cfg.train.gradient_checkpointing)


def free_memory(device: str) -> None:
    import torch

    gc.collect()
    if cuda(device):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def read_vmhwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def measure_variant(variant: str, model, batch: dict, device: str, steps: int, overrides) -> dict:
    """Peak memory and speed of `steps` optimizer steps (after one warm-up step) of a variant."""
    import torch

    from mode_cli.mode.weighting import loss_weights
    from mode_cli.train.distributed import World
    from mode_cli.train.optim import make_optimizer
    from mode_cli.train.plan import plan_run
    from mode_cli.train.recipe import build_head
    from mode_cli.train.steps import TrainingModule, accumulate_gradients

    cfg = recipe_config(variant, device, overrides)
    # The device choices `mode train` makes for one process: its device, optimizer and autocast.
    plan = plan_run(cfg, World())
    autocast = plan.autocast

    free_memory(device)
    if cuda(device):
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM back to the current RSS
        before = read_vmhwm()
    head = None if variant == "plain" else build_head(cfg, model, device)
    optimizer = make_optimizer(cfg, model, head, plan.device)
    weights = None
    if variant != "plain":
        weights = loss_weights(cfg.loss, head.layers if head else [], 1, cfg.train.max_steps)
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    tokens = int(batch["attention_mask"].sum())
    times, losses = [], []
    model.train()
    for step in range(steps + 1):
        if cuda(device):
            torch.cuda.synchronize()
        start = time.perf_counter()
        if variant == "plain":
            with autocast():
                out = model(**batch)
            out.loss.backward()
            loss = out.loss.item()
        else:
            module = TrainingModule(model, head)
            loss = accumulate_gradients(module, [batch], weights, cfg.loss.impl, autocast).loss
        torch.nn.utils.clip_grad_norm_(trainable, cfg.train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda(device):
            torch.cuda.synchronize()
        if step > 0:  # step 0 warms up kernels and allocates the optimizer state
            times.append(time.perf_counter() - start)
            losses.append(loss)
    record = {
        "variant": variant,
        "steps": steps,
        "tokens_per_step": tokens,
        "seconds_per_step": sum(times) / len(times),
        "tokens_per_s": tokens * len(times) / sum(times),
        "losses": losses,
    }
    if cuda(device):
        record["model_bytes"] = before
        record["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
        record["peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
    else:
        record["model_bytes"] = before
        record["peak_allocated_bytes"] = record["peak_reserved_bytes"] = read_vmhwm()
    del optimizer, head
    model.zero_grad(set_to_none=True)
    free_memory(device)
    return record


def measure_shape(
    shape_name: str,
    device: str,
    steps: int = 3,
    seq_len: int | None = None,
    micro_batch: int | None = None,
    overrides: list[str] | None = None,
    work: Path | None = None,
) -> dict:
    """Part c: build the model once, then measure every variant on the same batch."""
    import torch

    from mode_cli.data.batching import target_count

    overrides = list(overrides or [])
    if not cuda(device):
        overrides.append("train.optimizer_fallback=true")  # 8-bit AdamW runs on CUDA only
    cfg = recipe_config("mode", device, overrides)
    seq_len = seq_len or cfg.data.max_seq_len
    micro_batch = micro_batch or cfg.train.micro_batch_size
    shape = SHAPES[shape_name]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        model = build_model(cfg, shape, device, Path(tmp) / "model")
    built = time.perf_counter() - started
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, shape["vocab_size"], (micro_batch, seq_len), generator=generator)
    batch = {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "labels": ids.clone().to(device),  # every position a target: the loss's largest share
    }
    records = {v: measure_variant(v, model, batch, device, steps, overrides) for v in VARIANTS}
    mode, final = records["mode"], records["final-only"]
    return {
        "shape": shape_name,
        "device": device,
        "model_config": shape,
        "settings": {
            "precision": cfg.train.precision,
            "optimizer": cfg.train.optimizer
            + ("" if cuda(device) else " (run as torch AdamW on the CPU)"),
            "gradient_checkpointing": cfg.train.gradient_checkpointing,
            "adapter": {"r": cfg.adapter.r, "target_modules": str(cfg.adapter.target_modules)},
            "layers": cfg.layers.k,
            "micro_batch": micro_batch,
            "seq_len": seq_len,
            "target_tokens": target_count(batch),
        },
        "build_seconds": built,
        "variants": records,
        "ratios": {
            "peak_mode_over_final_only": mode["peak_allocated_bytes"]
            / final["peak_allocated_bytes"],
            "time_mode_over_final_only": mode["seconds_per_step"] / final["seconds_per_step"],
        },
        "limit_bytes": LIMIT_BYTES,
        "within_limit": all(
            records[v]["peak_reserved_bytes"] <= LIMIT_BYTES for v in RECIPE_VARIANTS
        ),
        "peak_ratio_target": PEAK_RATIO,
    }


# ---------------------------------------------------------------------------- g. the plan


def measure_plan(
    shape_name: str,
    device: str,
    grid=PLAN_GRID,
    overrides: list[str] | None = None,
    work: Path | None = None,
) -> dict:
    """Part g: the memory plan of `loss=mode` at each (sequence length, micro-batch) of `grid`
    against a measured optimizer step of the same model (after one that allocates the
    optimizer's states). On CUDA: the plan's peak less the CUDA context against the allocator's
    peak reserved memory, and less the slack too against its peak allocated memory; a paged
    optimizer's states live outside the allocator and are left out of both."""
    import torch
    from omegaconf import OmegaConf

    from mode_cli.train.fit import recipe_setup
    from mode_cli.train.footprint import model_facts
    from mode_cli.train.memory import CALIBRATION, plan_memory

    overrides = list(overrides or [])
    if not cuda(device):
        overrides.append("train.optimizer_fallback=true")
    cfg = recipe_config("mode", device, overrides)
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        folder = Path(tmp) / "model"
        model = build_model(cfg, SHAPES[shape_name], device, folder)
        planned = OmegaConf.merge(cfg, {"model": {"name_or_path": str(folder), "revision": None}})
        facts = model_facts(planned)
    rows = []
    for length, batch_size in grid:
        generator = torch.Generator().manual_seed(length + batch_size)
        ids = torch.randint(
            0, SHAPES[shape_name]["vocab_size"], (batch_size, length), generator=generator
        )
        batch = {
            "input_ids": ids.to(device),
            "attention_mask": torch.ones_like(ids).to(device),
            "labels": ids.clone().to(device),  # every position a target, as the plan assumes
        }
        measured = measure_variant("mode", model, batch, device, 1, overrides)
        sized = OmegaConf.merge(
            planned, {"train": {"micro_batch_size": batch_size}, "data": {"max_seq_len": length}}
        )
        plan = plan_memory(
            facts, recipe_setup(sized, facts, device), calibration=CALIBRATION[device]
        )
        outside = plan.item("optimizer") if plan.setup.optimizer.startswith("paged") else 0.0
        reserved = plan.peak - plan.item("runtime") - outside
        rows.append(
            {
                "seq_len": length,
                "micro_batch": batch_size,
                "planned_reserved_bytes": reserved,
                "planned_allocated_bytes": reserved - plan.item("slack"),
                "peak_reserved_bytes": measured["peak_reserved_bytes"],
                "peak_allocated_bytes": measured["peak_allocated_bytes"],
                "plan": plan.to_dict(),
            }
        )
    for row in rows:
        row["allocated_error"] = row["planned_allocated_bytes"] / row["peak_allocated_bytes"] - 1
        row["reserved_error"] = row["planned_reserved_bytes"] / row["peak_reserved_bytes"] - 1
    return {
        "shape": shape_name,
        "device": device,
        "rows": rows,
        "goal": PLAN_GOAL,
        "within_goal": all(
            abs(r["allocated_error"]) <= PLAN_GOAL and abs(r["reserved_error"]) <= PLAN_GOAL
            for r in rows
        ),
    }


def plan_markdown(part: dict) -> list[str]:
    """Part g's table."""
    lines = [
        "",
        f"The memory plan (`mode plan`, `loss=mode`) against the measured step, {part['shape']} "
        "shape: planned peak less the CUDA context vs `torch.cuda.max_memory_reserved`, and less "
        "the allocator slack too vs `max_memory_allocated` (a paged optimizer's states left out "
        f"of both). Goal: within {part['goal']:.0%}.",
        "",
        "| length | micro-batch | planned allocated GiB | measured | error | planned reserved GiB | measured | error |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in part["rows"]:
        lines.append(
            f"| {r['seq_len']} | {r['micro_batch']} | {r['planned_allocated_bytes'] / GIB:.2f} "
            f"| {r['peak_allocated_bytes'] / GIB:.2f} | {r['allocated_error']:+.1%} "
            f"| {r['planned_reserved_bytes'] / GIB:.2f} | {r['peak_reserved_bytes'] / GIB:.2f} "
            f"| {r['reserved_error']:+.1%} |"
        )
    verdict = "holds" if part["within_goal"] else "**missed**: recalibrate the CUDA constants"
    lines += ["", f"Plan within {part['goal']:.0%}: {verdict}."]
    return lines


# ---------------------------------------------------------------------------- the record


def ratio_holds(shape: dict) -> bool:
    return shape["ratios"]["peak_mode_over_final_only"] <= PEAK_RATIO


# The parts a record lists besides the 8B shape's table (part c).
PARTS = {
    "pytest": "a. pytest -m gpu",
    "e2e": "b. tiny recipe end to end",
    "fsdp": "d. FSDP2 under torchrun, then resumed by one process",
    "flagship": "e. llama3-8b-alpaca (train=gpu-24gb) at Llama-3-8B's layer shape",
    "engines": "f. an ensemble export in transformers (and vLLM)",
}


def markdown(record: dict) -> str:
    shape = record.get("shape")
    lines = [
        f"## GPU check: the 24 GB recipe at {SHAPE_TITLES.get(shape['shape'] if shape else '', 'a')} shape",
        "",
        f"`python scripts/gpu_check.py` on {record['machine']}; "
        + ", ".join(f"{k} {v}" for k, v in record["versions"].items())
        + f"; {record['date']}.",
    ]
    if shape:
        s = shape["settings"]
        lines += [
            "",
            f"Random-init {shape['shape']} ({shape['model_config']['num_hidden_layers']} layers, "
            f"hidden {shape['model_config']['hidden_size']}, vocab "
            f"{shape['model_config']['vocab_size']:,}), NF4 double-quant, {s['precision']}, LoRA "
            f"r{s['adapter']['r']} {s['adapter']['target_modules']}, gradient checkpointing "
            f"{s['gradient_checkpointing']}, {s['optimizer']}, a batch of {s['micro_batch']} x "
            f"{s['seq_len']} tokens (every position a target), the same batch for each; "
            f"{shape['variants']['mode']['steps']} timed steps after a warm-up. `plain` is "
            "transformers + peft with the model's own loss (full logits). Peaks are PyTorch's "
            "allocator's; the paged optimizer's 8-bit states (about 2 bytes a LoRA weight) live "
            "outside it.",
            "",
            "| step | peak allocated GiB | peak reserved GiB | tokens/s | s / step |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, v in shape["variants"].items():
            lines.append(
                f"| {name} | {v['peak_allocated_bytes'] / GIB:.2f} "
                f"| {v['peak_reserved_bytes'] / GIB:.2f} | {v['tokens_per_s']:,.0f} "
                f"| {v['seconds_per_step']:.2f} |"
            )
        r = shape["ratios"]
        verdict = "within" if shape["within_limit"] else "**over**"
        ratio_verdict = "holds" if ratio_holds(shape) else "**misses**"
        lines += [
            "",
            f"MoDE / final-only: peak {r['peak_mode_over_final_only']:.3f} (target <= "
            f"{PEAK_RATIO}: {ratio_verdict}), step time {r['time_mode_over_final_only']:.2f}. "
            f"Recipe peaks {verdict} {LIMIT_BYTES / 1e9:.0f} GB (reserved).",
        ]
    if "plan" in record:
        lines += plan_markdown(record["plan"])
    for part, title in PARTS.items():
        if part in record:
            done = record[part]
            detail = done.get("counts") or f"{len(done.get('steps', []))} commands"
            if part == "engines":
                detail = engines_detail(done)
            if part == "fsdp" and done.get("tokens_per_s"):
                detail += (
                    f"; {done['gpus']} GPU(s), {done['tokens_per_s']:,.0f} tokens/s, peak "
                    f"{done['peak_memory_gb']:.2f} GB per GPU"
                )
            if part == "fsdp" and "optimizer_checks" in done:
                expected = sum(c["as_expected"] for c in done["optimizer_checks"])
                detail += (
                    f"; paged 8-bit AdamW with FSDP: {expected} of "
                    f"{len(done['optimizer_checks'])} commands ended as they must (one process "
                    "trains, torchrun refused with exit 2, DDP trains)"
                )
            if part == "flagship" and done.get("peak_memory_gb") is not None:
                detail += f"; peak {done['peak_memory_gb']:.2f} GB, losses {done['losses']}"
            lines.append(f"- {title}: {'passed' if done['ok'] else '**failed**'} ({detail})")
    missing = [title for part, title in PARTS.items() if part not in record]
    if "shape" not in record:
        missing.append("c. the 8B-shaped memory and speed")
    if "plan" not in record:
        missing.append("g. the memory plan against the measured peaks")
    if missing:
        lines.append(f"- not run in this record: {'; '.join(missing)}")
    lines.append(f"\nOverall: {'passed' if record['passed'] else '**failed**'}.")
    return "\n".join(lines)


def engines_detail(done: dict) -> str:
    parts = [
        f"transformers {'matches' if done.get('transformers_matches_mode') else 'differs from'} mode"
    ]
    if "vllm" in done:
        parts.append(
            f"vLLM ({done.get('vllm_class')}): prompt log-probabilities within "
            f"{done['vllm_logprob_difference']:.1e} of transformers' (tolerance {VLLM_TOLERANCE:g}), "
            f"greedy tokens {'the same' if done['vllm_same_tokens'] else 'not all the same'}"
        )
    else:
        parts.append(f"vLLM skipped: {done.get('vllm_skipped', 'no record')}")
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", action="store_true", help="print what it runs, run nothing")
    parser.add_argument("--wheels", type=Path, help="install the carried wheels in this folder")
    parser.add_argument("--out", type=Path, help="also copy the record and the doc here")
    parser.add_argument("--json", type=Path, help="default: docs/gpu_check.json on CUDA")
    parser.add_argument("--doc", type=Path, help="default: docs/benchmarks.md on CUDA")
    parser.add_argument("--from-json", type=Path, help="rewrite the doc's section from a record")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a rehearsal")
    parser.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant")
    parser.add_argument("--seq-len", type=int, help="default: the recipe's data.max_seq_len")
    parser.add_argument("--micro-batch", type=int, help="default: train.micro_batch_size")
    parser.add_argument(
        "--skip",
        action="append",
        default=[],
        choices=[*PARTS, "shape", "plan"],
        help="a part not to run",
    )
    parser.add_argument(
        "--add-to",
        type=Path,
        help="the record of an earlier call: its parts are kept and this call's added (the check "
        "split over calls, e.g. on a machine lent for 10 minutes a command)",
    )
    args = parser.parse_args(argv)
    on_gpu = cuda(args.device)

    # A CPU rehearsal's figures are not the GPU's: they go to a temporary folder unless named.
    rehearsal = Path(tempfile.mkdtemp(prefix="gpu-check-cpu-")) if not on_gpu else None
    args.json = args.json or (rehearsal or ROOT / "docs") / "gpu_check.json"
    args.doc = args.doc or (rehearsal / "benchmarks.md" if rehearsal else DOC)
    if args.plan:
        print(plan(args))
        return 0
    if args.from_json:
        write_section("gpu_check", markdown(json.loads(args.from_json.read_text())), args.doc)
        return 0
    if args.wheels:
        install_wheels(args.wheels)  # runs this script again, without --wheels
    import torch

    if on_gpu and not torch.cuda.is_available():
        print(
            "gpu_check: torch sees no CUDA GPU. `--plan` says what it would run; "
            "`--device cpu --shape tiny --skip pytest --skip e2e` rehearses part c on the CPU.",
            file=sys.stderr,
        )
        return 2
    record: dict = json.loads(args.add_to.read_text()) if args.add_to else {}
    record |= {
        "machine": torch.cuda.get_device_name() if on_gpu else cpu_model() + " (CPU rehearsal)",
        "versions": versions(),
        "date": time.strftime("%Y-%m-%d"),
        "python": platform.python_version(),
    }
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    cache = work / "cache"
    try:
        if "pytest" not in args.skip:
            record["pytest"] = run_pytest(cache)
            print(f"a. pytest -m gpu: {record['pytest']['counts']}", file=sys.stderr)
        if "e2e" not in args.skip:
            record["e2e"] = run_e2e(work, cache)
            print(f"b. end to end: ok={record['e2e']['ok']}", file=sys.stderr)
        if "flagship" not in args.skip and on_gpu:
            record["flagship"] = run_flagship(work, cache)
            print(f"e. flagship recipe: ok={record['flagship']['ok']}", file=sys.stderr)
        if "fsdp" not in args.skip and on_gpu:
            record["fsdp"] = run_fsdp(work, cache)
            print(f"d. fsdp: ok={record['fsdp']['ok']}", file=sys.stderr)
        if "engines" not in args.skip:
            record["engines"] = run_engines(work, cache, args.device)
            print(f"f. engines: {engines_detail(record['engines'])}", file=sys.stderr)
        if "shape" not in args.skip:
            record["shape"] = measure_shape(
                args.shape, args.device, args.steps, args.seq_len, args.micro_batch, work=work
            )
            for v in record["shape"]["variants"].values():
                print(
                    f"c. {v['variant']:10} peak {v['peak_allocated_bytes'] / GIB:6.2f} GiB "
                    f"allocated, {v['peak_reserved_bytes'] / GIB:6.2f} reserved, "
                    f"{v['tokens_per_s']:8.0f} tokens/s",
                    file=sys.stderr,
                )
        if "plan" not in args.skip:
            record["plan"] = measure_plan(args.shape, args.device, work=work)
            for row in record["plan"]["rows"]:
                print(
                    f"g. plan {row['seq_len']} x {row['micro_batch']}: allocated "
                    f"{row['allocated_error']:+.1%}, reserved {row['reserved_error']:+.1%}",
                    file=sys.stderr,
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    parts = [record[p]["ok"] for p in PARTS if p in record]
    if "shape" in record:
        parts += [record["shape"]["within_limit"], ratio_holds(record["shape"])]
    record["passed"] = all(parts)
    args.json.write_text(json.dumps(record, indent=1) + "\n")
    write_section("gpu_check", markdown(record), args.doc)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(args.json, args.out / "gpu_check.json")
        shutil.copyfile(args.doc, args.out / "benchmarks.md")
    print(markdown(record))
    return 0 if record["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
