"""Device decisions, on a simulated GPU machine (tests/simulated_cuda.py): what a run on one or four
GPUs would do, checked on the CPU for every shipped recipe and `train=` option, one and four
processes, both strategies. Its device, backend, optimizer, dtypes and the base's quantization and
placement; the RNG state each process saves and restores (a 4-GPU checkpoint resumes on 1, a rank
joining a resumed run draws its own stream); the memory messages; and the one place that decides
what a device string means (mode_cli/devices.py).
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf
from simulated_cuda import MEMORY, NAME, seeded_state, simulate_cuda

from mode_cli.errors import ModeError
from mode_cli.train import checkpoint as checkpoint_mod
from mode_cli.train.distributed import World

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
EIGHT_BIT = ("adamw_8bit", "paged_adamw_8bit")
FSDP_REFUSAL = "cannot update the parameters distributed.strategy=fsdp shards"


def test_the_flagship_optimizer_is_chosen_for_a_process_on_cuda_0():
    """The one-GPU run's device is `cuda:0`, and its 8-bit optimizer runs there."""
    from mode_cli.train.optim import optimizer_on

    assert World().device("cuda") == "cuda:0"
    assert optimizer_on("paged_adamw_8bit", World().device("cuda"), False) == "paged_adamw_8bit"


# ---------------------------------------------------------------------------- one place decides

DEVICE_NAME = re.compile(r"^(cuda|cpu|mps|xpu|meta|auto)(:\d+)?$")


def device_comparisons(source: str) -> list[str]:
    """Each expression of `source` that compares a device string itself: `==`, `!=`, `in` or
    `not in` with a device name (`"cuda"`, `"cuda:0"`, `"cpu"`...), or against anything on an
    expression that names a device; `startswith` / `endswith` with a device name or on a device."""
    tree = ast.parse(source)

    def named_device(node: ast.AST) -> bool:
        return "device" in ast.unparse(node).lower()

    def device_literal(node: ast.AST) -> bool:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return bool(DEVICE_NAME.match(node.value)) and node.value != "auto"
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return any(device_literal(e) for e in node.elts)
        return False

    def string_literal(node: ast.AST) -> bool:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return True
        return isinstance(node, (ast.Tuple, ast.List, ast.Set)) and any(
            string_literal(e) for e in node.elts
        )

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(device_literal(s) for s in sides) or (
                any(named_device(s) for s in sides) and any(string_literal(s) for s in sides)
            ):
                found.append(ast.unparse(node))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("startswith", "endswith")
            and (named_device(node.func.value) or any(device_literal(a) for a in node.args))
        ):
            found.append(ast.unparse(node))
    return found


def test_the_comparison_finder_finds_each_form():
    code = "\n".join(
        [
            'a = device == "cuda"',
            'b = "cuda:0" != place',
            'c = x.type in ("cuda", "mps")',
            'd = args.device.startswith("cuda")',
            'e = cfg.train.device == "auto"',
            'f = name.startswith("cuda")',
        ]
    )
    assert len(device_comparisons(code)) == 6
    fine = (
        'is_cuda(device)\nx = "cuda" if ok else "cpu"\ny = name == "adamw"\nz = p.startswith("x")'
    )
    assert device_comparisons(fine) == []


def test_device_strings_are_compared_only_in_mode_cli_devices():
    """Everywhere else asks `is_cuda(device)` (or another function of mode_cli/devices.py)."""
    files = sorted((REPO / "mode_cli").rglob("*.py")) + sorted((REPO / "scripts").glob("*.py"))
    offenders = {
        str(path.relative_to(REPO)): found
        for path in files
        if path != REPO / "mode_cli" / "devices.py"
        and (found := device_comparisons(path.read_text()))
    }
    assert offenders == {}


# ---------------------------------------------------------------------------- every recipe


@cache
def composed(recipe: str, train: str):
    from mode_cli.recipes import compose_recipe

    return compose_recipe(recipe, [f"train={train}"])


def recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES.glob("*.yaml"))


def train_options() -> list[str]:
    return sorted(p.stem for p in (RECIPES / "train").glob("*.yaml"))


def asked(train: str) -> dict:
    """What a `train=` option asks for, read from its file (the schema's defaults otherwise)."""
    values = yaml.safe_load((RECIPES / "train" / f"{train}.yaml").read_text())
    return {
        "device": values.get("device", "auto"),
        "precision": values.get("precision", "fp32"),
        "optimizer": values.get("optimizer", "adamw"),
    }


def test_the_matrix_covers_the_flagship():
    assert "llama3-8b-alpaca" in recipes() and len(recipes()) >= 10
    assert "gpu-24gb" in train_options() and len(train_options()) >= 4


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("nproc", [1, 4])
def test_every_recipe_decides_on_a_gpu_machine_as_a_gpu_run_must(monkeypatch, nproc, strategy):
    """`nproc` GPUs, `distributed.nproc=nproc`: for every shipped recipe and train= option, what
    `validate` and each process's plan decide, against what the option asks for on a GPU."""
    from mode_cli.config import validate
    from mode_cli.devices import Machine
    from mode_cli.train.plan import plan_run

    simulate_cuda(monkeypatch, nproc)
    assert Machine.current() == Machine(gpus=nproc)
    problems = []
    for recipe in recipes():
        for train in train_options():
            cfg = composed(recipe, train).copy()
            cfg.distributed.nproc = nproc
            cfg.distributed.strategy = strategy
            want = asked(train)
            on_gpu = want["device"] in ("cuda", "auto")
            sharded = strategy == "fsdp" and nproc > 1
            eight_bit = want["optimizer"] in EIGHT_BIT
            where = f"{recipe} train={train} nproc={nproc} {strategy}"
            if eight_bit and (sharded or not on_gpu):
                with pytest.raises(ModeError) as refused:
                    validate(cfg)
                reason = FSDP_REFUSAL if on_gpu else "needs a CUDA GPU"
                if reason not in " ".join(str(refused.value).split()):
                    problems.append(f"{where}: refused for another reason: {refused.value}")
                continue
            validate(cfg)
            dtype = torch.bfloat16 if want["precision"] == "bf16" else torch.float32
            for rank in range(nproc):
                world = World(rank, nproc, rank, strategy, joined=nproc > 1)
                plan = plan_run(cfg, world)
                device = f"cuda:{rank}" if on_gpu else "cpu"
                expected = {
                    "device": device,
                    "backend": "nccl" if on_gpu else "gloo",
                    "sharded": sharded,
                    "optimizer": want["optimizer"],
                    "compute_dtype": dtype,
                    "autocast_dtype": torch.bfloat16 if dtype == torch.bfloat16 else None,
                    "base": {
                        "dtype": dtype,
                        "quantization": {
                            "load_in_4bit": True,
                            "bnb_4bit_quant_type": "nf4",
                            "bnb_4bit_use_double_quant": cfg.model.double_quant,
                            "bnb_4bit_compute_dtype": dtype,
                            "bnb_4bit_quant_storage": torch.uint8,
                        },
                        "device_map": {"": rank if on_gpu else "cpu"},
                    },
                }
                got = {key: getattr(plan, key) for key in expected}
                if got != expected:
                    problems.append(f"{where} rank {rank}: {got} != {expected}")
                with plan.autocast():
                    kind = "cuda" if on_gpu else "cpu"
                    if torch.is_autocast_enabled(kind) != (dtype == torch.bfloat16):
                        problems.append(f"{where} rank {rank}: autocast on {kind} is off")
    assert problems == []


def test_the_flagship_recipe_on_one_gpu_trains_in_8_bits_and_bf16(monkeypatch):
    from mode_cli.recipes import compose_recipe
    from mode_cli.train.plan import plan_run

    simulate_cuda(monkeypatch, 1)
    plan = plan_run(compose_recipe("llama3-8b-alpaca"), World())
    assert plan.device == "cuda:0" and plan.optimizer == "paged_adamw_8bit"
    assert plan.autocast_dtype == torch.bfloat16 and plan.base["device_map"] == {"": 0}
    assert plan.base["quantization"]["bnb_4bit_use_double_quant"] is True
    assert plan.summary() == "device cuda:0, paged_adamw_8bit, bf16 autocast"


def test_more_processes_than_gpus_and_no_gpu_are_refused(monkeypatch):
    from mode_cli.config import validate
    from mode_cli.recipes import compose_recipe

    simulate_cuda(monkeypatch, 1)
    with pytest.raises(ModeError, match="this machine has 1 GPU"):
        validate(compose_recipe("llama3-8b-alpaca", ["distributed.nproc=4"]))
    simulate_cuda(monkeypatch, 0)
    with pytest.raises(ModeError, match="torch sees no CUDA GPU"):
        validate(compose_recipe("llama3-8b-alpaca"))


# ---------------------------------------------------------------------------- the running code


def flagship(tmp_path: Path, *overrides: str):
    from mode_cli.recipes import compose_recipe

    return compose_recipe("llama3-8b-alpaca", [f"output_dir={tmp_path / 'run'}", *overrides])


def test_the_recipe_takes_its_device_choices_from_the_plan(monkeypatch, tmp_path):
    """FinetuneRecipe on a rank of a 4-GPU job: its device, autocast, optimizer and the base it
    loads are the plan's."""
    import bitsandbytes as bnb

    from mode_cli.models import loading
    from mode_cli.train import recipe as recipe_mod
    from mode_cli.train.optim import make_optimizer
    from mode_cli.train.plan import plan_run

    simulate_cuda(monkeypatch, 4)
    monkeypatch.setattr(World, "broadcast", lambda self, value: value)  # no process group here
    world = World(rank=3, size=4, local_rank=3, strategy="ddp", joined=True)
    cfg = flagship(tmp_path)
    run = recipe_mod.FinetuneRecipe(cfg, world=world)
    assert run.plan == plan_run(cfg, world) and run.device == "cuda:3"
    with run.autocast():
        assert torch.is_autocast_enabled("cuda")
        assert torch.get_autocast_dtype("cuda") == torch.bfloat16

    optimizer = make_optimizer(cfg, torch.nn.Linear(4, 4), None, run.device, run.plan.sharded)
    assert type(optimizer) is bnb.optim.PagedAdamW8bit

    loaded = []

    def load_base_model(source, model_cfg, precision, device):
        loaded.append(loading.base_placement(model_cfg, precision, device))
        raise InterruptedError  # what it would load is all this test needs

    monkeypatch.setattr(recipe_mod, "load_base_model", load_base_model)
    run.source = "meta-llama/Meta-Llama-3-8B"
    with pytest.raises(InterruptedError):
        run.setup_model()
    assert loaded == [run.plan.base] and run.plan.base["device_map"] == {"": 3}


def test_init_world_puts_each_rank_on_its_own_gpu_over_nccl(monkeypatch):
    import torch.distributed as dist

    from mode_cli.devices import resolve_device
    from mode_cli.train.distributed import init_world

    machine = simulate_cuda(monkeypatch, 4)
    for name, value in {
        "RANK": "2",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "2",
        "TORCHELASTIC_RUN_ID": "test",
    }.items():
        monkeypatch.setenv(name, value)
    backends = []
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **_: backends.append(backend))
    world = init_world("fsdp", 60, resolve_device("auto"))
    assert backends == ["nccl"] and machine.current == 2
    assert world.device("cuda") == "cuda:2" and world.sharded


# ---------------------------------------------------------------------------- memory


def test_the_out_of_memory_message_names_the_gpu_and_the_settings(monkeypatch, tmp_path):
    """The real handler on a rank's GPU: the cache emptied on that GPU, the message naming it."""
    from mode_cli.train import recipe as recipe_mod

    machine = simulate_cuda(monkeypatch, 2)
    monkeypatch.setattr(World, "broadcast", lambda self, value: value)
    world = World(rank=1, size=2, local_rank=1, strategy="ddp", joined=True)
    machine.set_device(1)  # init_world's doing
    run = recipe_mod.FinetuneRecipe(flagship(tmp_path), world=world)
    run.optimizer = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters())
    with pytest.raises(ModeError) as err:
        run.out_of_memory(7, boundary={})
    message = " ".join(str(err.value).split())
    assert message.startswith(
        f"out of GPU memory on cuda:1 ({NAME}, {MEMORY / 1e9:.1f} GB) at step 7. Lower memory "
        "with train.micro_batch_size (now 4; raise train.grad_accum_steps to keep the batch), "
        "data.max_seq_len (now 2048) or train.gradient_checkpointing=true (now true"
    )
    assert machine.emptied == [1]
    assert run.peak_memory_gb() == machine.peak[1] / 2**30


def test_the_cpu_message_says_the_cpu(monkeypatch, tmp_path):
    from mode_cli.train.plan import plan_run

    simulate_cuda(monkeypatch, 1)
    cfg = flagship(tmp_path, "train=cpu-smoke")
    assert (
        plan_run(cfg, World())
        .out_of_memory(cfg, 2, None)
        .startswith("out of memory on the CPU at step 2")
    )


def test_the_merge_returns_the_gpu_cache_of_a_process_on_cuda_0(monkeypatch, tmp_path):
    """The export at the end of training frees the merged model's cached GPU memory on `cuda:0`,
    the device a single process trains on, as on `cuda`."""
    from mode_cli.config import RecipeConfig
    from mode_cli.export import command

    written = []
    machine = simulate_cuda(monkeypatch, 1)
    monkeypatch.setattr(command, "check_run_files", lambda run_dir, cfg: None)
    monkeypatch.setattr(command, "has_adapter", lambda run_dir, cfg: True)
    monkeypatch.setattr(command, "merge_adapter", lambda cfg, source, adapter, device: object())
    monkeypatch.setattr(command, "load_tokenizer", lambda source, model_cfg: object())
    monkeypatch.setattr(command, "load_head", lambda run_dir, model, device: None)
    monkeypatch.setattr(command, "write", lambda target, *rest: written.append(target) or target)
    cfg = OmegaConf.structured(RecipeConfig)
    cfg.model.name_or_path = "unused"
    assert command.export_run(tmp_path, tmp_path / "merged", cfg, "cuda:0") == tmp_path / "merged"
    assert written == [tmp_path / "merged"]
    assert machine.emptied == [0]


# ---------------------------------------------------------------------------- random numbers


def distinct_states(machine) -> None:
    for i in range(machine.gpus):
        machine.set_rng_state(seeded_state(100 + i, 16 * i), i)


def test_each_process_saves_and_restores_its_own_gpus_rng_state(monkeypatch):
    machine = simulate_cuda(monkeypatch, 4)
    distinct_states(machine)
    for rank in range(4):
        state = checkpoint_mod.rng_state(f"cuda:{rank}")
        assert torch.equal(state["cuda"], seeded_state(100 + rank, 16 * rank))
    saved = checkpoint_mod.rng_state("cuda:2")
    machine.manual_seed_all(5)
    checkpoint_mod.set_rng_state(saved, "cuda:2")
    assert torch.equal(machine.rng[2], seeded_state(102, 32))
    assert all(torch.equal(machine.rng[i], seeded_state(5)) for i in (0, 1, 3))
    assert checkpoint_mod.rng_state("cpu")["cuda"] is None


def save_rngs(out: Path, rngs: list[dict]) -> Path:
    from mode_cli.config import RecipeConfig

    contents = checkpoint_mod.Contents(
        adapter={}, head=None, optimizer={}, scheduler={}, rng=rngs[0], rank_rngs=rngs[1:]
    )
    return checkpoint_mod.save_checkpoint(
        out,
        contents,
        state=checkpoint_mod.TrainerState(step=1),
        extra={},
        cfg=OmegaConf.structured(RecipeConfig),
        keep=2,
    )


def test_a_checkpoint_of_four_gpus_resumes_on_one(monkeypatch, tmp_path):
    """Four ranks save their GPUs' streams; one process on a 1-GPU machine continues rank 0's."""
    four = simulate_cuda(monkeypatch, 4)
    distinct_states(four)
    path = save_rngs(tmp_path, [checkpoint_mod.rng_state(f"cuda:{r}") for r in range(4)])

    one = simulate_cuda(monkeypatch, 1)
    checkpoint_mod.restore_rng(checkpoint_mod.rank_rng(path, 0), "cuda:0", seed=0, rank=0)
    assert torch.equal(one.rng[0], seeded_state(100, 0))


def test_an_earlier_checkpoint_with_every_gpus_state_resumes_on_fewer_gpus(monkeypatch):
    """Checkpoints of mode 0.1.0 hold every visible GPU's state: a process takes its own GPU's."""
    four = simulate_cuda(monkeypatch, 4)
    distinct_states(four)
    state = checkpoint_mod.rng_state("cpu") | {"cuda": four.get_rng_state_all()}
    one = simulate_cuda(monkeypatch, 1)
    checkpoint_mod.set_rng_state(state, "cuda:0")
    assert torch.equal(one.rng[0], seeded_state(100, 0))
    two = simulate_cuda(monkeypatch, 2)
    checkpoint_mod.set_rng_state(state, "cuda:1")
    assert torch.equal(two.rng[1], seeded_state(101, 16))
    checkpoint_mod.set_rng_state(checkpoint_mod.rng_state("cpu") | {"cuda": []}, "cuda:0")


def test_a_rank_joining_a_resumed_run_draws_its_own_stream(monkeypatch, tmp_path):
    """A checkpoint of one process, resumed by two: rank 1 has no state there and starts its own
    streams from seed + 1, not a copy of rank 0's (which would repeat rank 0's dropout masks)."""
    machine = simulate_cuda(monkeypatch, 2)
    checkpoint_mod.seed_everything(7)
    torch.rand(3)
    path = save_rngs(tmp_path, [checkpoint_mod.rng_state("cuda:0")])
    assert checkpoint_mod.rank_rng(path, 1) is None

    checkpoint_mod.restore_rng(checkpoint_mod.rank_rng(path, 0), "cuda:0", seed=7, rank=0)
    rank0 = torch.rand(5)
    checkpoint_mod.restore_rng(checkpoint_mod.rank_rng(path, 1), "cuda:1", seed=7, rank=1)
    rank1 = torch.rand(5)
    assert torch.equal(machine.rng[1], seeded_state(8))
    torch.manual_seed(8)
    assert torch.equal(rank1, torch.rand(5)) and not torch.equal(rank0, rank1)


# ---------------------------------------------------------------------------- FSDP and 8 bits


def test_an_8bit_optimizer_on_fsdp_shards_is_refused_before_anything_loads(mode, monkeypatch):
    from mode_cli.train import distributed

    simulate_cuda(monkeypatch, 4)
    monkeypatch.setattr(distributed, "launch", lambda *a, **k: pytest.fail("launched"))
    code, _, err = mode(
        "train", "recipe=llama3-8b-alpaca", "distributed.nproc=2", "distributed.strategy=fsdp"
    )
    message = " ".join(err.split())
    assert code == 2 and FSDP_REFUSAL in message
    assert "distributed.strategy=ddp" in message and "train.optimizer=adamw" in message


def test_under_torchrun_even_one_fsdp_process_is_refused_the_8bit_optimizer(monkeypatch):
    """A torchrun job of one process shards too (DTensor parameters); `mode train` alone with
    distributed.nproc=1 is one plain process, where the 8-bit optimizer runs."""
    from mode_cli.config import validate
    from mode_cli.recipes import compose_recipe

    simulate_cuda(monkeypatch, 1)
    cfg = compose_recipe("llama3-8b-alpaca", ["distributed.strategy=fsdp"])
    validate(cfg)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    with pytest.raises(ModeError, match=FSDP_REFUSAL):
        validate(cfg)


def test_bitsandbytes_8bit_adamw_still_fails_on_fsdp2_shards():
    """Why the combination is refused: bitsandbytes' 8-bit step on FSDP2's DTensor parameters
    fails (here on the CPU kernel; the CUDA kernel is reached through the same op, after the same
    DTensor dispatch). When this starts passing, the refusal in optim.optimizer_on can go."""
    import bitsandbytes as bnb
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.Linear(256, 8))
        fully_shard(model)
        optimizer = bnb.optim.AdamW8bit(model.parameters(), lr=1e-3)
        model(torch.randn(4, 128)).sum().backward()
        with pytest.raises(RuntimeError, match="DTensor"):
            optimizer.step()
    finally:
        dist.destroy_process_group()
