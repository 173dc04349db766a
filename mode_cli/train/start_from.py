"""Starting a new run from trained weights: `mode train ... init_from=PATH`.

A new run in a new folder, with a fresh optimizer, schedule and data position, any data and any
`loss`, whose adapter (and MoDE head, when it fits) starts from weights trained before. PATH is:

- a `mode` run folder (`config.yaml`): its final adapter (`adapter/`, peft format) and MoDE head
  (`mode_head.safetensors`, `mode_head.json`);
- one of its checkpoints (`checkpoints/step-NNNNNN/`): `adapter.safetensors`,
  `mode_head.safetensors` and the recipe it was trained with;
- any peft adapter folder (`adapter_config.json` with `adapter_model.safetensors` or `.bin`), as
  peft, TRL, axolotl or LLaMA-Factory write them: a LoRA trained elsewhere, to put MoDE on
  (`loss=mode`) or to train a MoDE head over, frozen (`loss=mode-only`).

`check` reads the source's settings and tensor headers, before any model weights load, and
refuses every difference from the recipe at once (another base model, adapter type, rank, alpha,
target modules, LoRA against DoRA, modules peft trains whole), each with the override that fixes
it. The adapter's tensor names and shapes are compared with the adapter the recipe would attach,
built on a weightless (meta) copy of the model. Nothing is written before the check passes.

Once the model is built, `load_adapter` puts the source's adapter weights into it and
`head_state` says whether the source's MoDE head fits the recipe's (same layers, router, norms)
or the run starts a fresh one, and why. The run folder's `init_from.json` records the source
and the sha256 of the weight files it started from (`record`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from mode_cli.artifacts import (
    ADAPTER_DIR,
    HEAD_INFO,
    HEAD_WEIGHTS,
    MERGED_CONFIG,
    PEFT_CONFIG,
    RUN_CONFIG,
    head_info_problem,
    load_run_config,
)
from mode_cli.config import method
from mode_cli.errors import ModeError
from mode_cli.files import load_tensors, read_json, tensor_shapes
from mode_cli.train import checkpoint as checkpoint_mod

PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
# What a head's tensors and behaviour depend on: the source's head is loaded only when all match.
HEAD_SHAPE = (
    "layers",
    "num_layers",
    "hidden_size",
    "router",
    "router_input",
    "train_final_norm",
    "fixed_weights",
)
# peft options that mode's adapter does not have: a source using any of them is refused.
PEFT_EXTRAS = {
    "use_rslora": (False, "rank-stabilised scaling (alpha / sqrt(r))"),
    "rank_pattern": ({}, "per-module ranks"),
    "alpha_pattern": ({}, "per-module alphas"),
    "modules_to_save": (None, "whole modules trained beside LoRA"),
    "layers_to_transform": (None, "LoRA on some layers only"),
    "trainable_token_indices": (None, "trained token embeddings"),
    "bias": ("none", "trained biases"),
}


@dataclass(frozen=True)
class Source:
    """What `init_from=` names, read without loading any weights.

    Attributes:
        path: the folder named.
        kind: `run` (a mode run folder), `checkpoint` (one of its checkpoints) or `peft` (a peft
            adapter folder).
        adapter_file: the adapter's weights, or None (a run that trained no adapter).
        peft_names: whether the adapter file names tensors as peft saves them
            (`...q_proj.lora_A.weight`) rather than by the model's parameters (a checkpoint).
        settings: the adapter's settings in mode's terms: r, alpha, use_dora, peft_type, the
            modules it adapts (from its tensors), and the peft options mode lacks that it uses.
        shapes: the adapter file's tensors by name.
        base: the base model the adapter was trained on, as the source records it (None: not
            recorded).
        head_file: the MoDE head's weights, or None.
        head_info: the head's description (`mode_head.json`), or None (a checkpoint: its recipe
            describes it, `recipe`).
        recipe: the source's recipe as a plain dict (mode sources), else None.
    """

    path: Path
    kind: str
    adapter_file: Path | None
    peft_names: bool
    settings: dict = field(default_factory=dict)
    shapes: dict = field(default_factory=dict)
    base: str | None = None
    head_file: Path | None = None
    head_info: dict | None = None
    recipe: dict | None = None

    def describe(self) -> str:
        """The source in words: `the mode run RUN`, `the peft adapter PATH`."""
        what = {
            "run": "the mode run",
            "checkpoint": "the mode checkpoint",
            "peft": "the peft adapter",
        }[self.kind]
        return f"{what} {self.path}"


# ---------------------------------------------------------------------------- reading a source


def find_source(spec: str) -> Source:
    """Read what `init_from=spec` names: its settings and tensor headers, no weights."""
    path = Path(spec).expanduser()
    if not path.exists():
        raise ModeError(f"init_from={spec}: not found")
    if not path.is_dir():
        raise ModeError(
            f"init_from={spec} is a file: name a mode run folder, one of its checkpoints, or a "
            f"peft adapter folder (the folder holding {PEFT_CONFIG})"
        )
    if checkpoint_mod.is_complete(path):
        return checkpoint_source(path)
    if (path / RUN_CONFIG).is_file():
        return run_source(path)
    if (path / PEFT_CONFIG).is_file():
        return peft_source(path)
    if (path / MERGED_CONFIG).is_file() or (path / "config.json").is_file():
        raise ModeError(
            f"init_from={spec} is a model folder, not an adapter: train on it with "
            f"model.name_or_path={spec} (init_from takes a mode run folder, one of its "
            f"checkpoints, or a peft adapter folder)"
        )
    raise ModeError(
        f"init_from={spec} is not a mode run folder ({RUN_CONFIG}), a checkpoint (COMPLETE) or a "
        f"peft adapter folder ({PEFT_CONFIG})"
    )


def peft_source(path: Path, kind: str = "peft", recipe: DictConfig | None = None) -> Source:
    """A peft adapter folder: its `adapter_config.json` and the header of its weights; `recipe`,
    the mode recipe that wrote it (a run folder's `adapter/`), describes its base instead."""
    config = read_json(path / PEFT_CONFIG)
    if not isinstance(config, dict):
        raise ModeError(f"{path / PEFT_CONFIG} is damaged: it holds no adapter settings")
    weights = next((path / name for name in PEFT_WEIGHTS if (path / name).is_file()), None)
    if weights is None:
        raise ModeError(
            f"init_from={path}: the adapter folder holds no weights ({' or '.join(PEFT_WEIGHTS)})"
        )
    shapes = weight_shapes(weights)
    described = {"base": config.get("base_model_name_or_path") or None}
    if recipe is not None:
        described = mode_fields(recipe)
    return Source(
        path=path,
        kind=kind,
        adapter_file=weights,
        peft_names=True,
        settings=peft_settings(config, shapes),
        shapes=shapes,
        **described,
    )


def weight_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of an adapter's weights: a safetensors header, or a torch file."""
    if path.suffix == ".safetensors":
        return tensor_shapes(path)
    return {name: tuple(t.shape) for name, t in load_torch_weights(path).items()}


def load_torch_weights(path: Path) -> dict[str, torch.Tensor]:
    state = checkpoint_mod.load_torch_file(path)
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise ModeError(f"{path} is damaged: it holds no tensors by name")
    return state


def peft_settings(config: dict, shapes: dict) -> dict:
    """An adapter_config.json in mode's terms, plus the peft options it uses that mode lacks."""
    extras = []
    for key, (default, what) in PEFT_EXTRAS.items():
        value = config.get(key, default)
        if value not in (default, None, {}, [], False):
            extras.append(f"{key}={value!r} ({what})")
    return {
        "peft_type": str(config.get("peft_type", "LORA")).upper(),
        "r": config.get("r"),
        "alpha": config.get("lora_alpha"),
        "use_dora": bool(config.get("use_dora", False)),
        "targets": adapted_modules(shapes),
        "extras": extras,
    }


def adapted_modules(shapes: dict) -> list[str]:
    """The short names of the modules an adapter's tensors adapt (`q_proj`, `down_proj`...)."""
    return sorted(
        {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in shapes if ".lora_" in name}
    )


def run_source(path: Path) -> Source:
    """A mode run folder: its final adapter and head, described by its recipe."""
    recipe = load_run_config(path)
    head_file, head_info = None, None
    if (path / HEAD_WEIGHTS).is_file() and (path / HEAD_INFO).is_file():
        head_file, head_info = path / HEAD_WEIGHTS, read_json(path / HEAD_INFO)
        problem = head_info_problem(head_info) if isinstance(head_info, dict) else "not an object"
        if problem is not None:
            raise ModeError(f"{path / HEAD_INFO} is damaged: {problem}")
        tensor_shapes(head_file)
    adapter = path / ADAPTER_DIR
    if (adapter / PEFT_CONFIG).is_file():
        found = peft_source(adapter, kind="run", recipe=recipe)
        return replace(found, path=path, head_file=head_file, head_info=head_info)
    if method(recipe).trains_adapter or head_file is None:
        newest = checkpoint_mod.latest_checkpoint(path)
        hint = f": start from its newest checkpoint, init_from={newest}" if newest else ""
        raise ModeError(
            f"init_from={path}: the run has no final adapter ({ADAPTER_DIR}/{PEFT_CONFIG}); it has "
            f"not finished{hint}"
        )
    return head_only(path, "run", recipe, head_file, head_info)


def head_only(
    path: Path, kind: str, recipe: DictConfig, head_file: Path | None, head_info: dict | None = None
) -> Source:
    """A mode source without an adapter (a run that trained a MoDE head alone): its head."""
    return Source(
        path=path,
        kind=kind,
        adapter_file=None,
        peft_names=False,
        head_file=head_file,
        head_info=head_info,
        **mode_fields(recipe),
    )


def mode_fields(recipe: DictConfig) -> dict:
    """What a mode source's recipe says of it: its base model and the recipe itself."""
    return {
        "base": recipe.model.name_or_path,
        "recipe": OmegaConf.to_container(recipe, resolve=True),
    }


def checkpoint_source(path: Path) -> Source:
    """A mode checkpoint: its adapter and head, described by the recipe it was trained with."""
    recipe = load_run_config(path)
    if (problem := checkpoint_mod.file_damage(path, recipe)) is not None:
        raise ModeError(f"init_from={path}: {problem}")
    head_file = path / checkpoint_mod.HEAD
    head_file = head_file if head_file.is_file() else None
    adapter = path / checkpoint_mod.ADAPTER
    if not adapter.is_file():
        # A run that trained a head over a frozen adapter keeps the adapter in its run folder.
        frozen = checkpoint_mod.run_folder(path) / ADAPTER_DIR
        if (frozen / PEFT_CONFIG).is_file():
            found = peft_source(frozen, kind="checkpoint", recipe=recipe)
            return replace(found, path=path, head_file=head_file)
        return head_only(path, "checkpoint", recipe, head_file)
    shapes = tensor_shapes(adapter)
    settings = {
        "peft_type": "LORA",
        "r": recipe.adapter.r,
        "alpha": recipe.adapter.alpha,
        "use_dora": recipe.adapter.use_dora,
        "targets": adapted_modules(shapes),
        "extras": [],
    }
    return Source(
        path=path,
        kind="checkpoint",
        adapter_file=adapter,
        peft_names=False,
        settings=settings,
        shapes=shapes,
        head_file=head_file,
        **mode_fields(recipe),
    )


# ---------------------------------------------------------------------------- comparing


def check(cfg: DictConfig, resolved: str) -> Source:
    """The source `cfg.init_from` names, checked against the recipe before any weights load;
    one ModeError listing every difference, each with the override that fixes it. `resolved` is
    where the recipe's model loads from (`loading.resolve_source`)."""
    source = find_source(str(cfg.init_from))
    found = differences(source, cfg, resolved)
    if found:
        raise ModeError(
            f"init_from={cfg.init_from}: {source.describe()} does not fit this recipe:\n"
            + "\n".join(f"  - {line}" for line in found)
            + "\nnothing was written"
        )
    return source


def differences(source: Source, cfg: DictConfig, resolved: str) -> list[str]:
    """Every way the source differs from what the recipe would train on and attach."""
    found = base_differences(source, cfg, resolved)
    if source.adapter_file is None:
        return found
    settings, adapter = source.settings, cfg.adapter
    if settings["peft_type"] != "LORA":
        found.append(
            f"adapter type: the source is a {settings['peft_type']} adapter; mode trains LoRA and "
            "DoRA adapters"
        )
        return found  # its rank, alpha and tensors mean something else
    if settings["use_dora"] != adapter.use_dora:
        kinds = {True: "DoRA", False: "LoRA"}
        found.append(
            f"DoRA/LoRA: the source is a {kinds[settings['use_dora']]} adapter, this recipe "
            f"trains {kinds[adapter.use_dora]} (set adapter.use_dora={str(settings['use_dora']).lower()})"
        )
    if settings["r"] != adapter.r:
        found.append(
            f"adapter.r: {settings['r']} in the source, {adapter.r} in this recipe (set "
            f"adapter.r={settings['r']})"
        )
    if settings["alpha"] is not None and float(settings["alpha"]) != float(adapter.alpha):
        alpha = settings["alpha"]
        found.append(
            f"adapter.alpha: {alpha} in the source, {adapter.alpha} in this recipe: the adapter's "
            f"scale alpha/r would change (set adapter.alpha={alpha})"
        )
    for extra in settings["extras"]:
        found.append(f"peft option {extra}: mode's adapter has none")
    skeleton = adapter_skeleton(cfg, resolved)
    if skeleton is not None:
        available, wanted, expected = skeleton
        if set(settings["targets"]) != set(wanted):
            ours = "all-linear" if adapter.target_modules == "all-linear" else "this recipe"
            fix = (
                "all-linear"
                if set(settings["targets"]) == set(available)
                else "[" + ",".join(settings["targets"]) + "]"
            )
            found.append(
                f"adapter.target_modules: the source adapts {', '.join(settings['targets'])}; "
                f"{ours} adapts {', '.join(sorted(wanted))} (set adapter.target_modules={fix})"
            )
        if not found:
            saved = {name: tuple(shape) for name, shape in source.shapes.items()}
            names = expected["peft"] if source.peft_names else expected["parameters"]
            problem = checkpoint_mod.shapes_mismatch_of(saved, names, source.adapter_file)
            if problem is not None:
                found.append(problem)
    return found


def base_differences(source: Source, cfg: DictConfig, resolved: str) -> list[str]:
    """The base model: the source's recipe's model (a mode source) or the adapter's recorded
    base (a peft adapter) against the recipe's."""
    ours = cfg.model
    if source.recipe is not None:
        theirs = source.recipe["model"]
        found = []
        if not same_name(theirs["name_or_path"], ours.name_or_path, resolved, exact=True):
            found.append(
                f"base model: the source was trained on {theirs['name_or_path']}, this recipe "
                f"loads {ours.name_or_path} (set model.name_or_path={theirs['name_or_path']})"
            )
        elif theirs.get("revision") != ours.revision:
            found.append(
                f"base model revision: {theirs.get('revision')} in the source, {ours.revision} "
                f"in this recipe (set model.revision={theirs.get('revision')})"
            )
        elif str(ours.name_or_path).startswith("tiny:"):
            mine = OmegaConf.to_container(ours.tiny, resolve=True)
            for key in sorted(mine):
                if theirs.get("tiny", {}).get(key) != mine[key]:
                    found.append(
                        f"base model: model.tiny.{key} is {theirs.get('tiny', {}).get(key)} in "
                        f"the source, {mine[key]} in this recipe (another tiny model)"
                    )
        return found
    if source.base is None:
        return []  # not recorded: the tensor check below is what tells
    if same_name(source.base, ours.name_or_path, resolved):
        return []
    return [
        f"base model: the adapter was trained on {source.base} (base_model_name_or_path in "
        f"{source.path / PEFT_CONFIG}), this recipe loads {ours.name_or_path}: set "
        f"model.name_or_path={source.base}, or, when {ours.name_or_path} is that model under "
        "another name, write its name into that field"
    ]


def same_name(theirs: str, ours: str, resolved: str, exact: bool = False) -> bool:
    """Whether two names of a base model name the same one: equal, the same folder, or (for a
    peft adapter's record, `exact=False`) a hub id and a local copy with the same last part
    (`meta-llama/Meta-Llama-3-8B`, `/models/Meta-Llama-3-8B`)."""
    if theirs in (ours, resolved):
        return True
    paths = [Path(name).expanduser() for name in (theirs, resolved)]
    if all(path.exists() for path in paths) and paths[0].resolve() == paths[1].resolve():
        return True
    if exact:
        return False
    last = [name.rstrip("/").rsplit("/", 1)[-1].lower() for name in (theirs, ours)]
    return last[0] == last[1] and bool(last[0])


def adapter_skeleton(cfg: DictConfig, resolved: str):
    """(the model's linear module names, the modules the recipe's adapter targets, the adapter
    tensors it would have: {"peft": names as peft saves them, "parameters": by parameter name}),
    from a weightless (meta) copy of the model: no weights read. None when the model's config
    cannot be read here (the loading step reports it)."""
    from accelerate import init_empty_weights
    from peft import get_peft_model, get_peft_model_state_dict
    from transformers import AutoConfig, AutoModelForCausalLM

    from mode_cli.models.loading import adapter_targets, linear_module_names, peft_config

    try:
        config = AutoConfig.from_pretrained(
            resolved, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code
        )
    except (OSError, ValueError):
        return None
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    available = linear_module_names(skeleton)
    targets = adapter_targets(skeleton, cfg.adapter.target_modules)
    wanted = available if targets == "all-linear" else list(targets)
    peft = get_peft_model(skeleton, peft_config(cfg.adapter, targets))
    expected = {
        "peft": {k: tuple(v.shape) for k, v in get_peft_model_state_dict(peft).items()},
        "parameters": {
            name: tuple(p.shape) for name, p in peft.named_parameters() if p.requires_grad
        },
    }
    return available, wanted, expected


# ---------------------------------------------------------------------------- loading


def load_adapter(source: Source, model) -> None:
    """Put the source's adapter weights into the adapter attached to `model` (a peft model the
    recipe built: `check` made sure they fit)."""
    if source.peft_names:
        from peft import set_peft_model_state_dict

        state = load_weights(source.adapter_file)
        result = set_peft_model_state_dict(model, state)
        missing = [key for key in result.missing_keys if "lora_" in key]
        if result.unexpected_keys or missing:
            raise ModeError(
                f"init_from: {source.adapter_file} does not fit this model's adapter "
                f"({len(missing)} tensors missing, e.g. {missing[:2]}; "
                f"{len(result.unexpected_keys)} unexpected, e.g. {result.unexpected_keys[:2]})"
            )
        return
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in load_tensors(source.adapter_file).items():
            params[name].copy_(value)


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    return load_tensors(path) if path.suffix == ".safetensors" else load_torch_weights(path)


def head_state(source: Source, head, build) -> tuple[dict | None, str]:
    """(the source's MoDE head weights, or None for a fresh head; why, in words). `build(recipe)`
    makes the head a mode recipe describes (a checkpoint's has no `mode_head.json`)."""
    if head is None:
        if source.head_file is not None:
            return None, "the source's MoDE head is left out: this run's loss trains none"
        return None, ""
    if source.head_file is None:
        return None, "fresh: the source has no MoDE head"
    theirs = source.head_info
    if theirs is None:
        theirs = build(OmegaConf.create(source.recipe)).describe()
    # Fields a mode_head.json of an earlier release lacks, at the values it was trained with.
    theirs = {"router_input": "final", "train_final_norm": False, "fixed_weights": None, **theirs}
    ours = head.describe()
    differ = [
        f"{key} {theirs.get(key)} there, {ours.get(key)} here"
        for key in HEAD_SHAPE
        if theirs.get(key) != ours.get(key)
    ]
    if differ:
        return None, "fresh: the source's head differs: " + "; ".join(differ)
    state = load_tensors(source.head_file)
    expected = {name: tuple(t.shape) for name, t in head.state_dict().items()}
    if {name: tuple(t.shape) for name, t in state.items()} != expected:
        return None, f"fresh: {source.head_file} does not hold tensors of this head's shapes"
    return state, f"loaded from {source.head_file}"


def describe_start(source: Source, record: dict, *, trained: list[str], new: str) -> str:
    """The start-of-run words of a run from `source`: what carries over (with the digests
    `record` holds), what is fresh and why; `trained`: what the run trains (`adapter`, `MoDE
    head`); `new`: the rest that is new, in words."""
    carried = []
    if record["adapter"] is not None:
        use = record["adapter"]["use"]
        how = "trained on" if use == "trained" else "kept frozen, the head trains over it"
        carried.append(f"the adapter ({how}; sha256 {record['adapter']['sha256'][:12]})")
    if record["head"] is not None:
        carried.append(f"the MoDE head (sha256 {record['head']['sha256'][:12]})")
    fresh = []
    if "adapter" in trained and record["adapter"] is None:
        fresh.append("a fresh adapter (the source has none)")
    if "MoDE head" in trained and record["head"] is None:
        fresh.append(f"a fresh MoDE head ({record['head_note'].removeprefix('fresh: ')})")
    words = (
        f"start from {source.describe()}. Carried over: {' and '.join(carried)}. "
        f"New: {', '.join([*fresh, new])}."
    )
    if "MoDE head" not in trained and record["head_note"]:
        words += f" {record['head_note']}."
    return words + " The eval at step 0 measures the starting point"


def record(source: Source, adapter_use: str | None, head_note: str, head_loaded: bool) -> dict:
    """What `init_from.json` records: the source and the sha256 of each weight file the run
    started from. `adapter_use`: `trained` (the run trains the adapter on), `frozen` (it trains a
    head over it) or None (not used)."""

    def weights(path: Path | None) -> dict | None:
        if path is None:
            return None
        return {"file": str(path.resolve()), "sha256": checkpoint_mod.sha256_of(path)}

    return {
        "source": str(source.path.resolve()),
        "kind": source.kind,
        "base_model": source.base,
        "adapter": {**weights(source.adapter_file), "use": adapter_use}
        if adapter_use is not None
        else None,
        "head": weights(source.head_file) if head_loaded else None,
        "head_note": head_note,
    }
