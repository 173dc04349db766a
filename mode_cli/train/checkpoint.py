"""Resumable training state: what a checkpoint holds, writing it atomically, finding and loading it.

<output_dir>/checkpoints/step-000010/
  adapter.safetensors    the trainable adapter parameters, by their names in the peft model
  mode_head.safetensors  the MoDE head's state dict
  optimizer.pt           optimizer state (tensors and numbers only: loads with weights_only=True)
  scheduler.pt           LR scheduler state
  rng.pt                 python, numpy, torch and CUDA RNG states, as tensors (rank 0's; the
                         other ranks' in rng-rank-N.pt, each with its own GPU's state only)
  config.yaml            the resolved recipe the checkpoint was trained with
  trainer_state.json     the run's counters (`TrainerState`: step, data position, elapsed time...),
                         max_steps and the identity of the training data
  manifest.json          the size and sha256 of every file above, written after them
  COMPLETE               written last

A checkpoint is staged in a hidden sibling folder and renamed into place, so a process killed
mid-write leaves the previous checkpoints untouched and no folder that looks complete.

Before a checkpoint is used it is checked: every file it needs is there and opens, the safetensors
headers parse, the sizes and checksums match its manifest (checkpoints of releases before the
manifest have none and skip that check), and, once the model is built, the tensors' names and
shapes match it. `resume=auto` (or a run folder) names a damaged checkpoint and continues from the
newest intact one before it; a checkpoint named explicitly is refused with the reason. A run
continues from one checkpoint and rewrites what came after it: the run folder's newer checkpoints
are removed as it resumes, and pruning keeps the one it resumed from beside the newest
`checkpoint.keep`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import random
import re
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file

from mode_cli import devices
from mode_cli.artifacts import CHECKPOINTS_DIR, load_run_config
from mode_cli.config import method
from mode_cli.errors import ModeError
from mode_cli.files import load_tensors, read_json, read_yaml, staged_folder, tensor_shapes
from mode_cli.train.extend import Lineage, continuation

log = logging.getLogger(__name__)

CHECKPOINTS = CHECKPOINTS_DIR
COMPLETE = "COMPLETE"
STATE = "trainer_state.json"
MANIFEST = "manifest.json"
ADAPTER = "adapter.safetensors"
HEAD = "mode_head.safetensors"
TORCH_FILES = ("optimizer.pt", "scheduler.pt", "rng.pt")
_NAME = re.compile(r"^step-(\d+)$")

# Keys that may change between a checkpoint and the run that resumes it: where and how long this
# invocation runs, how often it logs, evaluates and checkpoints, and what happens after training.
RESUMABLE_CHANGES = (
    "recipe",
    "output_dir",
    "resume",
    "logger",
    "merge",
    "merge.",
    "eval.",
    "checkpoint.",
    "train.stop_after_steps",
    "train.max_minutes",
    "train.log_every",
    "train.threads",
    "train.on_nonfinite",
    "train.gradient_checkpointing",  # the same gradients for less memory (what an OOM asks for)
    "train.memory_budget",  # micro_batch_size=auto resumes with the run's own micro-batch
    # The number of processes and how they share the model: any world that keeps the global
    # micro-batch (train.micro_batch_size x processes, checked on its own) continues the run.
    "train.micro_batch_size",
    "distributed.",
    "data.max_eval_examples",
    # How the data are read and checked, not which: the same training examples either way.
    "data.cache",
    "data.num_proc",
    "data.streaming",
    "data.require_eos",
)
# Keys a resume decides rather than compares (`extend.continuation`): the step budget, which an
# extension raises; the switch asking for it; the record of extensions and the weights the run
# started from, both taken from the checkpoint.
CONTINUATION_KEYS = ("train.max_steps", "train.extend", "train.extensions", "init_from")


@dataclass
class TrainerState:
    """A run's counters: what a checkpoint records of its progress and a resume restores whole.

    Attributes:
        step: optimizer steps done.
        epoch, index: the data position, the epoch and the index of its next micro-batch (each
            epoch's order is a pure function of the seed, so this restarts the stream exactly).
        skipped_steps: steps whose update was skipped for a non-finite loss.
        seen_tokens: attended tokens trained on so far (for tokens/s).
        elapsed_s: training seconds of the whole run up to the checkpoint.
        best_eval_loss: the lowest eval loss during training (ensemble, else final layer).
        last_loss: the loss of the last logged step.
    """

    step: int = 0
    epoch: int = 0
    index: int = 0
    skipped_steps: int = 0
    seen_tokens: int = 0
    elapsed_s: float = 0.0
    best_eval_loss: float | None = None
    last_loss: float | None = None

    @classmethod
    def from_record(cls, record: dict) -> TrainerState:
        """The counters of a `trainer_state.json` record (which also holds max_steps, data)."""
        return cls(**{f.name: record[f.name] for f in fields(cls) if f.name in record})


def checkpoint_dir(out: Path, step: int) -> Path:
    return out / CHECKPOINTS / f"step-{step:06d}"


def run_folder(checkpoint: Path) -> Path:
    """The run folder a checkpoint belongs to (the inverse of `checkpoint_dir`)."""
    return checkpoint.parent.parent


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file() and (path / STATE).is_file()


def step_of(path: Path) -> int:
    """The step a checkpoint folder is named after (`step-000010`: 10)."""
    return int(_NAME.match(path.name).group(1))


def complete_checkpoints(out: Path) -> list[Path]:
    """The complete checkpoints of a run folder, oldest first."""
    folder = out / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [
        (int(match.group(1)), path)
        for path in folder.iterdir()
        if (match := _NAME.match(path.name)) and is_complete(path)
    ]
    return [path for _, path in sorted(found)]


def latest_checkpoint(out: Path) -> Path | None:
    found = complete_checkpoints(out)
    return found[-1] if found else None


@dataclass(frozen=True)
class ResumeCandidates:
    """The checkpoints `resume=` may continue from, newest first. `explicit`: a checkpoint folder
    named by the user (refused when damaged), not a run's checkpoints (the next one is tried)."""

    paths: list[Path]
    explicit: bool


def resume_candidates(resume: str, out: Path) -> ResumeCandidates:
    """What `resume=` names: `auto` (the checkpoints in `out`, none for a new run), a checkpoint
    folder, or a run folder (its checkpoints)."""
    if resume == "auto":
        return ResumeCandidates(complete_checkpoints(out)[::-1], explicit=False)
    path = Path(resume)
    if is_complete(path):
        return ResumeCandidates([path], explicit=True)
    if (path / CHECKPOINTS).is_dir() or (path / "config.yaml").is_file():
        found = complete_checkpoints(path)[::-1]
        if not found:
            raise ModeError(f"resume={resume}: {path} holds no complete checkpoint")
        return ResumeCandidates(found, explicit=False)
    if path.exists():
        raise ModeError(
            f"resume={resume}: {path} is neither a complete checkpoint (no {COMPLETE} marker) nor a "
            "run folder"
        )
    raise ModeError(f"resume={resume}: {path} not found")


def first_intact(
    candidates: ResumeCandidates, problem: Callable[[Path], str | None]
) -> ResumeCandidates:
    """The candidates from the newest one `problem` finds nothing wrong with.

    A damaged checkpoint the user named is refused with the reason; a run's damaged checkpoints
    are named in a warning and skipped; when none is intact, the refusal names each and why.
    """
    damaged = []
    for i, path in enumerate(candidates.paths):
        found = problem(path)
        if found is None:
            for skipped, why in damaged:
                log.warning(f"checkpoint {skipped} is damaged, skipped: {why}")
            return ResumeCandidates(candidates.paths[i:], candidates.explicit)
        if candidates.explicit:
            raise ModeError(f"cannot resume from {path}: {found}")
        damaged.append((path, found))
    raise ModeError(
        f"no intact checkpoint to resume from in {run_folder(candidates.paths[0])}:\n"
        + "\n".join(f"  - {path.name}: {why}" for path, why in damaged)
        + "\nstart again in another output_dir (nothing was changed)"
    )


def file_damage(path: Path, cfg: DictConfig) -> str | None:
    """What is wrong with a checkpoint's files, or None: the checks that need no model (files
    present and opening, safetensors headers, sizes and checksums against the manifest)."""
    trained = method(cfg)
    needed = [STATE, "config.yaml", *TORCH_FILES]
    needed += [ADAPTER] if trained.trains_adapter else []
    needed += [HEAD] if trained.trains_head else []
    try:
        for name in needed:
            if not (path / name).is_file():
                return f"{path / name} is missing"
        if (path / MANIFEST).is_file():
            for name, recorded in manifest_files(path).items():
                if (problem := checksum_problem(path / name, recorded)) is not None:
                    return problem
        if (problem := state_problem(read_json(path / STATE))) is not None:
            return f"{path / STATE} is damaged: {problem}"
        read_yaml(path / "config.yaml")
        for name in (ADAPTER, HEAD):
            if name in needed:
                tensor_shapes(path / name)
        for name in TORCH_FILES:
            # torch saves a zip archive: its directory, at the end, is gone from a truncated file.
            with zipfile.ZipFile(path / name):
                pass
    except zipfile.BadZipFile:
        return f"{path / name} is damaged: truncated or not a file torch.save wrote"
    except ModeError as err:
        return str(err)
    except OSError as err:  # a failing disk, a file without read permission
        return f"{getattr(err, 'filename', None) or path / name}: cannot be read ({err.strerror or err})"
    return None


def state_problem(record: object) -> str | None:
    """What is wrong with a `trainer_state.json` record (a counter that is not a number, the
    data's identity missing), or None. Counters a release before them did not write may be
    absent."""
    if not isinstance(record, dict) or not is_count(record.get("step")):
        return "it holds no step count"
    for item in fields(TrainerState):
        if item.name not in record:
            continue
        value = record[item.name]
        if item.type == "int" and not is_count(value):
            return f"{item.name} is {value!r}, not a count"
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if item.type != "int" and not (number or (value is None and "None" in item.type)):
            return f"{item.name} is {value!r}, not a number"
    for key in ("max_steps", "global_micro_batch", "processes"):
        if key in record and not is_count(record[key]):
            return f"{key} is {record[key]!r}, not a count"
    if not isinstance(record.get("data"), dict):
        return "data (the identity of the training data) is missing"
    return None


def is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def weights_mismatch(path: Path, model, head) -> str | None:
    """Whether the checkpoint's tensors have the names and shapes of this model's trainable
    parameters and this head's; None when they do."""
    expected = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    problem = shapes_mismatch(path / ADAPTER, expected) if expected else None
    if problem is None and head is not None:
        problem = shapes_mismatch(
            path / HEAD, {k: tuple(v.shape) for k, v in head.state_dict().items()}
        )
    return problem


def shapes_mismatch(path: Path, expected: dict[str, tuple]) -> str | None:
    try:
        saved = tensor_shapes(path)
    except ModeError as err:
        return str(err)
    return shapes_mismatch_of(saved, expected, path)


def shapes_mismatch_of(
    saved: dict[str, tuple], expected: dict[str, tuple], path: Path
) -> str | None:
    """How the tensors of the file `path` (`saved`, by name) differ from `expected`, or None."""
    missing, extra = sorted(expected.keys() - saved.keys()), sorted(saved.keys() - expected.keys())
    if missing or extra:
        return (
            f"{path} does not match this model ({len(missing)} tensors missing, e.g. "
            f"{missing[:2]}; {len(extra)} unexpected, e.g. {extra[:2]})"
        )
    for name, shape in expected.items():
        if saved[name] != shape:
            return (
                f"{path} does not match this model: {name} has shape {saved[name]} there, "
                f"{shape} here"
            )
    return None


def manifest_files(path: Path) -> dict[str, dict]:
    """The manifest's record of each file: {name: {"bytes": size, "sha256": digest}}."""
    manifest = read_json(path / MANIFEST)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise ModeError(f"{path / MANIFEST} is damaged: it lists no files")
    for name, recorded in files.items():
        size = recorded.get("bytes") if isinstance(recorded, dict) else None
        digest = recorded.get("sha256") if isinstance(recorded, dict) else None
        if not is_count(size) or not isinstance(digest, str):
            raise ModeError(
                f"{path / MANIFEST} is damaged: its record of {name} is not a size and checksum "
                f"({recorded!r})"
            )
    return files


def checksum_problem(path: Path, recorded: dict) -> str | None:
    if not path.is_file():
        return f"{path} is missing"
    if path.stat().st_size != recorded.get("bytes"):
        return (
            f"{path}: {path.stat().st_size:,} bytes, {recorded.get('bytes'):,} when it was "
            "written (truncated or changed)"
        )
    if sha256_of(path) != recorded.get("sha256"):
        return f"{path}: checksum differs from the one recorded when it was written (damaged)"
    return None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------- RNG states


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's generators (torch's seeds every GPU's too)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state(device: str = "cpu") -> dict:
    """Every RNG the training step draws from, as tensors and numbers (weights_only-loadable):
    python's, numpy's, the CPU's and, for a process on a GPU, that GPU's. Only this process's own
    GPU: each rank saves its own, so a checkpoint written by 4 GPUs resumes on 1."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {
            "version": version,
            "state": torch.tensor(mt, dtype=torch.int64),
            "gauss": gauss,
        },
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": devices.rng_state(device),
    }
    return state


def set_rng_state(state: dict, device: str = "cpu") -> None:
    """Put back the generators `rng_state` saved; a saved GPU state goes to this process's GPU."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["kind"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached"],
        )
    )
    torch.set_rng_state(state["torch"])
    devices.set_rng_state(own_gpu_state(state["cuda"], device), device)


def own_gpu_state(saved, device: str) -> torch.Tensor | None:
    """The saved GPU RNG state this process continues. Earlier checkpoints (mode 0.1.0's among
    them) hold a list, the state of every GPU the process saw: its own is the entry of its GPU
    number (the others' streams belong to other processes), absent on a machine with fewer GPUs."""
    if not isinstance(saved, list):
        return saved
    index = devices.cuda_index(device) if devices.is_cuda(device) else 0
    return saved[index] if index < len(saved) else None


def restore_rng(state: dict | None, device: str, seed: int, rank: int) -> None:
    """Continue this process's random streams from its checkpointed `state`. A rank the checkpoint
    has no state for (the run resumes with more processes than wrote it) starts streams of its
    own from the seed and its rank, as that rank of a new run does (`seed + rank`): a copy of
    another rank's would draw the same dropout masks as that rank."""
    if state is None:
        seed_everything(seed + rank)
    else:
        set_rng_state(state, device)


# ---------------------------------------------------------------------------- writing


@dataclass
class Contents:
    """What a checkpoint holds besides its config and counters, as plain tensors and dicts.

    Attributes:
        adapter: the trainable adapter parameters, by their names in the peft model.
        head: the MoDE head's state dict (None without a head).
        optimizer: the optimizer's state dict (torch's format, parameters numbered in group order).
        scheduler: the LR scheduler's state dict.
        rng: the RNG states of rank 0 (a single process's own); read back for another rank, that
            rank's, or None when the checkpoint has none for it (`read_checkpoint`).
        rank_rngs: the other ranks' RNG states, rank 1 first, when several processes trained.
    """

    adapter: dict[str, torch.Tensor]
    head: dict[str, torch.Tensor] | None
    optimizer: dict
    scheduler: dict
    rng: dict | None
    rank_rngs: list[dict] = field(default_factory=list)


def rank_rng_file(rank: int) -> str:
    """The file of rank `rank`'s RNG states in a checkpoint (rank 0's, a single process's own, is
    `rng.pt`)."""
    return f"rng-rank-{rank}.pt" if rank else "rng.pt"


def rank_rng(path: Path, rank: int) -> dict | None:
    """The RNG states rank `rank` saved in a checkpoint; None when the checkpoint was written by
    fewer processes and has none for it."""
    rng_file = path / rank_rng_file(rank)
    return load_torch_file(rng_file) if rng_file.is_file() else None


def save_checkpoint(
    out: Path,
    contents: Contents,
    *,
    state: TrainerState,
    extra: dict,
    cfg: DictConfig,
    keep: int,
    resumed_from: Path | None = None,
) -> Path:
    """Write the checkpoint of step `state.step` atomically, then prune (`prune`: the newest
    `keep`, this one and `resumed_from`, the checkpoint this invocation continued, stay).

    `contents.rng` is the RNG state at the step boundary the checkpoint stands for (taken by the
    caller before the next step draws from it); `extra` goes into trainer_state.json beside the
    counters (max_steps, the data's identity, the global batch).
    """
    target = checkpoint_dir(out, state.step)
    record = {**asdict(state), **extra}
    with staged_folder(target, replace=True) as staging:
        write_contents(staging, contents, record, cfg)
    prune(out, keep, protect=(target, resumed_from))
    return target


def write_contents(staging: Path, contents: Contents, record: dict, cfg: DictConfig) -> None:
    if contents.adapter:
        save_file(contents.adapter, str(staging / ADAPTER))
    if contents.head is not None:
        save_file(contents.head, str(staging / HEAD))
    torch.save(contents.optimizer, staging / "optimizer.pt")
    torch.save(contents.scheduler, staging / "scheduler.pt")
    for rank, rng in enumerate([contents.rng, *contents.rank_rngs]):
        torch.save(rng, staging / rank_rng_file(rank))
    (staging / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (staging / STATE).write_text(json.dumps(record, indent=2) + "\n")
    write_manifest(staging)
    (staging / COMPLETE).write_text("")


def write_manifest(folder: Path) -> None:
    """The size and sha256 of every file in the folder, to tell a damaged checkpoint later."""
    files = {
        path.name: {"bytes": path.stat().st_size, "sha256": sha256_of(path)}
        for path in sorted(folder.iterdir())
        if path.is_file() and path.name not in (MANIFEST, COMPLETE)
    }
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=2) + "\n")


def prune(out: Path, keep: int, protect: tuple[Path | None, ...] = ()) -> None:
    """Drop all but the newest `keep` complete checkpoints, and staging folders left behind by a
    process killed mid-write (one run folder has one writer at a time).

    `protect` stays whatever its step: the checkpoint just written (the newest intact one) and
    the one the run resumed from (checked intact before use: the last state known good until
    the run is resumed again). Checkpoints newer than that one are gone already
    (`drop_superseded`), so a damaged one never takes an intact one's place.
    """
    kept = {Path(path) for path in protect if path is not None}
    for old in complete_checkpoints(out)[:-keep]:
        if old not in kept:
            shutil.rmtree(old, ignore_errors=True)
    for leftover in (out / CHECKPOINTS).glob(".step-*.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def drop_superseded(out: Path, step: int) -> list[Path]:
    """Remove the checkpoints of `out` after `step`, that of the one a run continues from: they
    are the past the run rewrites (its metrics.jsonl drops their steps too), damaged ones that
    resume=auto skipped or the rest of a history resume=PATH went back on. Left in place, they
    would count as the newest in pruning and in the next resume=auto. Returns them."""
    newer = [path for path in complete_checkpoints(out) if step_of(path) > step]
    for path in newer:
        shutil.rmtree(path, ignore_errors=True)
    return newer


# ---------------------------------------------------------------------------- loading


def fingerprint(path: Path) -> str | None:
    """What tells two copies of a checkpoint apart: the digest of its manifest (which holds every
    file's checksum) or, in a checkpoint of a release before the manifest, of its counters."""
    for name in (MANIFEST, STATE):
        if (path / name).is_file():
            try:
                return sha256_of(path / name)
            except OSError:
                return None
    return None


def read_state(path: Path) -> dict:
    return read_json(path / STATE)


def load_torch_file(path: Path):
    """A checkpoint's torch file, tensors and numbers only (weights_only)."""
    try:
        return torch.load(path, weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError) as err:
        # torch reports a damaged archive as a RuntimeError ("PytorchStreamReader failed ...").
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModeError(f"{path} is damaged: {reason}") from None


def config_differences(saved: DictConfig, current: DictConfig) -> list[str]:
    """`key: saved -> current` for every setting that differs and that a resume must keep."""
    old = flatten(OmegaConf.to_container(saved, resolve=True))
    new = flatten(OmegaConf.to_container(current, resolve=True))
    lines = []
    for key in sorted(old.keys() | new.keys()):
        if key in CONTINUATION_KEYS or any(
            key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE_CHANGES
        ):
            continue
        if old.get(key) != new.get(key):
            lines.append(f"{key}: {old.get(key)!r} -> {new.get(key)!r}")
    return lines


def flatten(tree: object, prefix: str = "") -> dict[str, object]:
    if isinstance(tree, dict):
        flat: dict[str, object] = {}
        for key, value in tree.items():
            flat.update(flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: tree}


def check_compatible(path: Path, cfg: DictConfig, world_size: int = 1) -> Lineage:
    """Refuse a checkpoint trained with another recipe (model, data, layers, loss, schedule...),
    or with another global micro-batch (`train.micro_batch_size` x processes), or another step
    budget unless `train.extend` asks for one (`extend.continuation`). Returns what the run
    takes from the checkpoint: its extensions (and the one starting now) and `init_from`."""
    # On the schema, with renamed keys migrated: keys added since take their defaults.
    saved = load_run_config(path)
    differences = config_differences(saved, cfg)
    state = read_state(path)
    lineage, problems = continuation(saved, state["step"], cfg)
    differences += problems
    before = state.get("global_micro_batch", saved.train.micro_batch_size)
    now = cfg.train.micro_batch_size * world_size
    if before != now:
        differences.append(
            f"global micro-batch (train.micro_batch_size x processes): {before} -> {now} "
            f"({cfg.train.micro_batch_size} x {world_size} now)"
        )
    if differences:
        raise ModeError(
            f"cannot resume from {path}: it was trained with another recipe. Settings that "
            "differ (checkpoint -> now):\n"
            + "\n".join(f"  - {line}" for line in differences)
            + "\nresume with the checkpoint's settings, or start a new run in another output_dir"
        )
    return lineage


def read_checkpoint(path: Path, *, model, head, rank: int = 0) -> tuple[Contents, dict]:
    """A checkpoint's contents, checked against the model and head about to receive them
    (tensor names and shapes), and its trainer_state.json record.

    `rank` picks the RNG states to restore: that rank's, or None when the checkpoint was written
    by fewer processes (`restore_rng` then derives the rank's streams from the seed and the rank;
    taking rank 0's would make the two ranks draw the same dropout masks).
    """
    head_file = path / HEAD
    if (head is not None) != head_file.is_file():
        raise ModeError(f"cannot resume from {path}: the MoDE head does not match this recipe")
    if (problem := weights_mismatch(path, model, head)) is not None:
        raise ModeError(f"cannot resume from {path}: {problem}")
    contents = Contents(
        adapter=load_tensors(path / ADAPTER) if (path / ADAPTER).is_file() else {},
        head=load_tensors(head_file) if head is not None else None,
        optimizer=load_torch_file(path / "optimizer.pt"),
        scheduler=load_torch_file(path / "scheduler.pt"),
        rng=rank_rng(path, rank),
    )
    if contents.rng is not None and not holds_rng_states(contents.rng):
        raise ModeError(
            f"cannot resume from {path}: {path / rank_rng_file(rank)} does not hold the RNG states a "
            "checkpoint saves"
        )
    return contents, read_state(path)


def holds_rng_states(state: object) -> bool:
    """Whether a loaded rng file has the python, numpy and torch states `rng_state` saves (a valid
    torch file of something else would fail half-way through restoring them)."""
    try:
        return (
            isinstance(state["python"]["state"], torch.Tensor)
            and isinstance(state["numpy"]["keys"], torch.Tensor)
            and isinstance(state["torch"], torch.Tensor)
        )
    except (KeyError, TypeError, IndexError):
        return False
