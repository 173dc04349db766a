"""Bad input ends in one message and exit 2, never a traceback, and changes nothing.

One row per kind of bad input a user can give: the command's words, the setup that makes the bad
file or folder in the row's own folder, and words the message must hold (what it names). Every
row runs the real CLI in-process and checks the exit code, the message, that no traceback was
printed, and that no file was written or changed anywhere in the row's folder or the shared run.
A new kind of bad input is one more line in ROWS.

Placeholders in a row's words: `{tmp}` the row's folder (also the working directory), `{run}` a
finished tiny run shared by the module (read-only), `{copy}` the row's own copy of it (made by a
`damaged(...)` setup step), `{old}` a copy of a run written by mode 0.1.0 (`old_run(...)`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "run-0.1.0"  # written by mode 0.1.0
# The shared run: finished, two checkpoints (step-000001, step-000002), no merged model.
RUN = (
    "recipe=tiny-llama-alpaca",
    "merge=false",
    "train.max_steps=2",
    "checkpoint.every_steps=1",
    "eval.compare_base=false",
    "eval.answers=off",
    "eval.max_examples=4",
    "data.max_eval_examples=4",
)
TRAIN = ("train", "recipe=tiny-llama-alpaca", "output_dir={tmp}/out", "merge=false")
DATA = (*TRAIN, "data.train={tmp}/d.jsonl")
MINE = ("train", "recipe={tmp}/my.yaml")
MY_DIR = ("train", "--recipes-dir", "{tmp}/r", "recipe=mine")
RESUME = ("train", *RUN, "output_dir={copy}")
# The shared run continued to another step budget (train.max_steps given by the row).
EXTEND = (
    "train",
    *(word for word in RUN if not word.startswith("train.max_steps=")),
    "output_dir={copy}",
    "resume=auto",
)
LAST = "checkpoints/step-000002"
FIRST = "checkpoints/step-000001"
RESUME_LAST = f"resume={{copy}}/{LAST}"
# The fixture's own recipe (tests/fixtures/README.md).
RESUME_OLD = (
    "train",
    "recipe=tiny-llama-alpaca",
    "train.max_steps=4",
    "checkpoint.every_steps=2",
    "train.lr_schedule=constant",
    "output_dir={old}",
)
GOOD = {"instruction": "Add 1 and 2.", "output": "3"}
LINE = json.dumps(GOOD) + "\n"
CHAT = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
RECIPE = (
    "defaults:\n  - base\n  - model: tiny-llama\n  - data: arithmetic-sample\n"
    "  - train: cpu-tiny\n  - _self_\n"
)

Step = Callable[[Path, Path], None]


# ---------------------------------------------------------------------------- setup steps


def file(name: str, content: str | bytes) -> Step:
    """A file in the row's folder."""

    def make(tmp: Path, run: Path) -> None:
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")

    return make


def jsonl(name: str, *rows: object) -> Step:
    return file(name, "".join(json.dumps(row) + "\n" for row in rows))


def folder(name: str) -> Step:
    return lambda tmp, run: (tmp / name).mkdir(parents=True)


def damaged(*damages: Callable[[Path], None]) -> Step:
    """The row's own copy of the shared run, `{tmp}/run`, with some of its files damaged."""

    def make(tmp: Path, run: Path) -> None:
        shutil.copytree(run, tmp / "run")
        for damage in damages:
            damage(tmp / "run")

    return make


def old_run(*damages: Callable[[Path], None]) -> Step:
    """The row's own copy of the run written by mode 0.1.0, `{tmp}/old`, with damaged files."""

    def make(tmp: Path, run: Path) -> None:
        shutil.copytree(FIXTURE, tmp / "old")
        for damage in damages:
            damage(tmp / "old")

    return make


def truncate(name: str, size: int) -> Callable[[Path], None]:
    def cut(run: Path) -> None:
        with (run / name).open("r+b") as handle:
            handle.truncate(size)

    return cut


def remove(name: str) -> Callable[[Path], None]:
    return lambda run: (run / name).unlink()


def overwrite(name: str, content: str | bytes) -> Callable[[Path], None]:
    def write(run: Path) -> None:
        data = content.encode() if isinstance(content, str) else content
        (run / name).write_bytes(data)

    return write


def edit_json(name: str, change: Callable[[dict], object]) -> Callable[[Path], None]:
    """The JSON file with `change` applied to its object (a field removed, of another type)."""

    def edit(run: Path) -> None:
        data = json.loads((run / name).read_text())
        change(data)
        (run / name).write_text(json.dumps(data))

    return edit


def remove_tree(name: str) -> Callable[[Path], None]:
    return lambda run: shutil.rmtree(run / name)


def unreadable(name: str) -> Callable[[Path], None]:
    """A checkpoint file whose reads fail as on a failing disk (EIO): a link to /proc/self/mem,
    whose size (0 bytes) the manifest is made to record, so that only reading it tells."""

    def make(run: Path) -> None:
        path = run / name
        path.unlink()
        path.symlink_to("/proc/self/mem")
        edit_json(
            f"{Path(name).parent}/manifest.json", lambda m: m["files"][path.name].update(bytes=0)
        )(run)

    return make


def flip_byte(name: str) -> Callable[[Path], None]:
    """One byte in the middle of the file changed: the size and the header stay valid."""

    def flip(run: Path) -> None:
        data = bytearray((run / name).read_bytes())
        data[len(data) - 16] ^= 0xFF
        (run / name).write_bytes(bytes(data))

    return flip


def torch_file(name: str, content: object) -> Callable[[Path], None]:
    """A valid torch file holding something other than what the checkpoint keeps there."""

    def write(run: Path) -> None:
        torch.save(content, run / name)

    return write


def other_tensors(name: str) -> Callable[[Path], None]:
    """Valid safetensors holding tensors of other shapes (a file from another model)."""

    def write(run: Path) -> None:
        (run / name).unlink()
        save_file({"router.weight": torch.zeros(2, 7)}, str(run / name))

    return write


# ---------------------------------------------------------------------------- the table


def row(kind: str, args: tuple[str, ...], says: str | tuple[str, ...], *setup: Step):
    """One kind of bad input: the command's words, what the message must name, the setup."""
    return pytest.param(args, (says,) if isinstance(says, str) else says, setup, id=kind)


# fmt: off
ROWS = [
    # recipes
    row("unknown recipe name", ("train", "recipe=nope"), "Unknown recipe 'nope'"),
    row("missing recipe file", ("train", "recipe={tmp}/my.yaml"), "not found: {tmp}/my.yaml"),
    row("recipe .yml", ("train", "recipe={tmp}/my.yml"), "must end in .yaml"),
    row("recipe YAML syntax error", MINE, "{tmp}/my.yaml, line 7, column 18", file("my.yaml", RECIPE + "train: {lr: [1, 2}\n")),
    row("recipe not UTF-8", MINE, "{tmp}/my.yaml: not UTF-8 text", file("my.yaml", RECIPE.encode() + b"# caf\xe9\n")),
    row("recipe is a list", MINE, "{tmp}/my.yaml is not a recipe", file("my.yaml", "- base\n- model: tiny-llama\n")),
    row("recipe is a folder", MINE, "{tmp}/my.yaml is a folder", folder("my.yaml")),
    row("recipe without base", MINE, "does not build on the schema", file("my.yaml", "train:\n  lr: 0.1\n")),
    row("recipe with an unknown key", MINE, "Unknown config key 'train.lrr'", file("my.yaml", RECIPE + "train:\n  lrr: 0.1\n")),
    row("recipes dir is a file", ("train", "recipe=tiny-llama-alpaca", "--recipes-dir", "{tmp}/r"), "{tmp}/r is a file", file("r", "x")),
    row("group option with a YAML error", (*MY_DIR, "train=broken"), "{tmp}/r/train/broken.yaml, line 2, column 1", file("r/mine.yaml", RECIPE), file("r/train/broken.yaml", "lr: [\n")),
    row("group option not UTF-8", (*MY_DIR, "train=latin"), "{tmp}/r/train/latin.yaml: not UTF-8 text (line 1: byte 0xe9)", file("r/mine.yaml", RECIPE), file("r/train/latin.yaml", b"# caf\xe9\nlr: 0.1\n")),
    row("train without recipe", ("train", "train.lr=1"), "needs recipe=NAME"),
    row("recipes cp under a file", ("recipes", "cp", "tiny-llama-alpaca", "{tmp}/f/my.yaml"), "{tmp}/f is a file", file("f", "x")),
    # overrides
    row("value of the wrong type", (*TRAIN, "train.lr=abc"), "train.lr"),
    row("unknown key", (*TRAIN, "train.lrr=1"), "Unknown config key 'train.lrr'"),
    row("unknown group option", (*TRAIN, "layers=last99"), "last99"),
    row("out-of-range value", (*TRAIN, "layers.k=0"), "layers.k=0"),
    row("override that does not parse", (*TRAIN, "train.lr=[1,"), "Could not parse"),
    row("merge shorthand misspelt", (*TRAIN, "merge=maybe"), "merge=maybe"),
    row("CUDA on a CPU", (*TRAIN, "train.device=cuda"), "train.device=cuda"),
    row("eval examples=0", ("eval", "checkpoint={run}", "examples=0"), "examples"),
    row("generate without prompt", ("generate", "checkpoint={run}"), "prompt"),
    row("generate unknown head", ("generate", "checkpoint={run}", "prompt=x", "head=mid"), "head"),
    # data files
    row("data not UTF-8 (UTF-16 BOM)", DATA, "{tmp}/d.jsonl: not UTF-8 text", file("d.jsonl", b"\xff\xfe\x00")),
    row("data Latin-1 on line 3", DATA, "{tmp}/d.jsonl: not UTF-8 text (line 3", file("d.jsonl", LINE.encode() * 2 + b'{"instruction": "caf\xe9"}\n')),
    row("data that is binary", DATA, "{tmp}/d.jsonl: not UTF-8 text", file("d.jsonl", bytes(range(256)) * 4)),
    row("data is a folder", DATA, "{tmp}/d.jsonl is a folder", folder("d.jsonl")),
    row("data folder without suffix", (*TRAIN, "data.train={tmp}"), "{tmp} is a folder"),
    row("data file missing", DATA, "not found: {tmp}/d.jsonl"),
    row("data file empty", DATA, "{tmp}/d.jsonl holds no rows", file("d.jsonl", "")),
    row("eval data is a folder", (*TRAIN, "data.eval={tmp}/e"), "{tmp}/e is a folder", folder("e")),
    row("JSON that is an object", (*TRAIN, "data.train={tmp}/d.json"), "expected a JSON list", file("d.json", '{"rows": []}')),
    row("JSON that does not parse", (*TRAIN, "data.train={tmp}/d.json"), "{tmp}/d.json: not valid JSON", file("d.json", "[{")),
    row("JSON lines with a bad line", DATA, "line 2: not valid JSON", file("d.jsonl", LINE + "{oops\n")),
    row("a huge line that is not JSON", DATA, "line 1: not valid JSON", file("d.jsonl", "x" * 20_000_000 + "\n")),
    row("JSON nested too deeply", DATA, "{tmp}/d.jsonl: not valid JSON (nested too deeply)", file("d.jsonl", "[" * 100_000 + "]" * 100_000)),
    row("rows that are not objects", DATA, "row 1: expected an object", jsonl("d.jsonl", 1, 2, 3)),
    row("missing field", DATA, "row 2: missing field 'output'", jsonl("d.jsonl", GOOD, {"instruction": "x"})),
    row("field of the wrong type", DATA, "row 1: field 'output' is not a string", jsonl("d.jsonl", {"instruction": "x", "output": 3})),
    row("unpaired surrogate in a string", DATA, "row 1: field 'instruction' holds an unpaired surrogate", file("d.jsonl", '{"instruction": "a\\ud800", "output": "3"}\n')),
    row("mapped column missing", (*DATA, "data.fields.instruction=question"), "'question' (data.fields.instruction)", jsonl("d.jsonl", GOOD)),
    row("chat: unknown role", (*DATA, "data.format=chat"), "unknown role 'robot'", jsonl("d.jsonl", {"messages": [{"role": "robot", "content": "x"}]})),
    row("chat: no assistant turn", (*DATA, "data.format=chat"), "row 2: no assistant turn", jsonl("d.jsonl", CHAT, {"messages": [{"role": "user", "content": "x"}]})),
    row("chat: messages not a list", (*DATA, "data.format=chat"), "not a non-empty list", jsonl("d.jsonl", {"messages": "hello"})),
    row("chat: content not a string", (*DATA, "data.format=chat"), "message 2: 'content'", jsonl("d.jsonl", {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": 1}]})),
    row("text: empty document", (*DATA, "data.format=text"), "row 1: empty 'text'", jsonl("d.jsonl", {"text": " "})),
    row("every row bad and skipped", (*DATA, "data.on_bad_row=skip"), "empty after removing 2 bad rows", jsonl("d.jsonl", 1, 2)),
    # paths
    row("output_dir is a file", (*TRAIN[:2], "output_dir={tmp}/f"), "output_dir={tmp}/f: {tmp}/f is a file", file("f", "x")),
    row("output_dir under a file", (*TRAIN[:2], "output_dir={tmp}/f/run"), "{tmp}/f is a file", file("f", "x")),
    row("output_dir that cannot be created", (*TRAIN[:2], "output_dir=/proc/mode-test/run"), "cannot create a folder in /proc"),
    row("output_dir holds a run", (*TRAIN[:2], "output_dir={run}"), "already holds a run"),
    row("model folder missing", (*TRAIN, "model.name_or_path=./nope"), "not found: ./nope"),
    row("model folder without config.json", (*TRAIN, "model.name_or_path={tmp}/m"), "{tmp}/m is not a model folder", folder("m")),
    row("eval checkpoint missing", ("eval", "checkpoint={tmp}/nope"), "not found: {tmp}/nope"),
    row("eval report folder is a file", ("eval", "checkpoint={run}", "eval.output_dir={tmp}/f"), "{tmp}/f is a file", file("f", "x")),
    row("eval data group with a YAML error", ("eval", "checkpoint={run}", "data={tmp}/d.yaml"), "{tmp}/d.yaml, line 2, column 1", file("d.yaml", "train: [\n")),
    # checkpoints
    row("every checkpoint damaged", (*RESUME, "resume=auto"), (f"{LAST}/adapter.safetensors", f"{FIRST}/rng.pt"), damaged(truncate(f"{LAST}/adapter.safetensors", 5), truncate(f"{FIRST}/rng.pt", 9))),
    row("resume=PATH truncated adapter", (*RESUME, RESUME_LAST), f"{LAST}/adapter.safetensors", damaged(truncate(f"{LAST}/adapter.safetensors", 100))),
    row("resume=PATH one byte changed", (*RESUME, RESUME_LAST), f"{LAST}/optimizer.pt: checksum", damaged(flip_byte(f"{LAST}/optimizer.pt"))),
    row("resume=PATH missing file", (*RESUME, RESUME_LAST), f"{LAST}/scheduler.pt is missing", damaged(remove(f"{LAST}/scheduler.pt"))),
    row("resume=PATH bad trainer_state.json", (*RESUME, RESUME_LAST), f"{LAST}/trainer_state.json", damaged(overwrite(f"{LAST}/trainer_state.json", "{"), remove(f"{LAST}/manifest.json"))),
    row("resume=PATH truncated rng.pt, no manifest", (*RESUME, RESUME_LAST), f"{LAST}/rng.pt", damaged(truncate(f"{LAST}/rng.pt", 50), remove(f"{LAST}/manifest.json"))),
    row("resume=PATH other tensors, no manifest", (*RESUME, RESUME_LAST), f"{LAST}/mode_head.safetensors", damaged(other_tensors(f"{LAST}/mode_head.safetensors"), remove(f"{LAST}/manifest.json"))),
    row("resume=PATH manifest not JSON", (*RESUME, RESUME_LAST), f"{LAST}/manifest.json: not valid JSON", damaged(overwrite(f"{LAST}/manifest.json", "{"))),
    row("resume=PATH manifest record not an object", (*RESUME, RESUME_LAST), f"{LAST}/manifest.json is damaged: its record of rng.pt", damaged(edit_json(f"{LAST}/manifest.json", lambda m: m["files"].update({"rng.pt": 5})))),
    row("resume=PATH manifest record without size", (*RESUME, RESUME_LAST), f"{LAST}/manifest.json is damaged: its record of rng.pt", damaged(edit_json(f"{LAST}/manifest.json", lambda m: m["files"]["rng.pt"].pop("bytes")))),
    row("resume=PATH unreadable file", (*RESUME, RESUME_LAST), f"{LAST}/optimizer.pt: cannot be read (Input/output error)", damaged(unreadable(f"{LAST}/optimizer.pt"))),
    row("resume=PATH trainer_state.json counter as text", (*RESUME, RESUME_LAST), f"{LAST}/trainer_state.json is damaged: epoch", damaged(edit_json(f"{LAST}/trainer_state.json", lambda s: s.update(epoch="0")), remove(f"{LAST}/manifest.json"))),
    row("resume=PATH trainer_state.json without data", (*RESUME, RESUME_LAST), f"{LAST}/trainer_state.json is damaged: data", damaged(edit_json(f"{LAST}/trainer_state.json", lambda s: s.pop("data")), remove(f"{LAST}/manifest.json"))),
    row("resume=PATH rng.pt of something else, no manifest", (*RESUME, RESUME_LAST), f"{LAST}/rng.pt does not hold", damaged(torch_file(f"{LAST}/rng.pt", {"python": 1}), remove(f"{LAST}/manifest.json"))),
    row("resume=PATH a file", (*RESUME, "resume={tmp}/f"), "{tmp}/f", file("f", "x"), damaged()),
    row("resume=PATH a foreign folder", (*RESUME, "resume={tmp}/e"), "neither a complete checkpoint", folder("e"), damaged()),
    row("resume with a damaged metrics.jsonl", (*RESUME, "resume=auto"), "{copy}/metrics.jsonl, line 1", damaged(overwrite("metrics.jsonl", "{oops\n"))),
    row("resume with a metrics step that is text", (*RESUME, "resume=auto"), "{copy}/metrics.jsonl, line 1: not a metrics record", damaged(overwrite("metrics.jsonl", '{"step": "2"}\n'))),
    # extending a run
    row("extend to fewer steps", (*EXTEND, "train.max_steps=1", "train.extend=replan"), "train.max_steps: 2 -> 1: an extension only adds steps", damaged()),
    row("more steps without train.extend", (*EXTEND, "train.max_steps=4"), ("train.max_steps: 2 -> 4", "add train.extend=replan", "train.extend=restart"), damaged()),
    row("extend to the same budget", (*EXTEND, "train.max_steps=2", "train.extend=replan"), "the run's budget is 2 steps already", damaged()),
    row("extend without a checkpoint", (*EXTEND, "train.max_steps=4", "train.extend=restart"), ("holds a run but no complete checkpoint", "init_from={copy}"), damaged(remove_tree("checkpoints"))),
    row("extend a folder without a run", (*TRAIN, "resume=auto", "train.max_steps=4", "train.extend=replan"), "{tmp}/out holds no run to extend"),
    row("extend without resume", (*TRAIN, "train.extend=replan"), "train.extend=replan extends a run: add resume=auto"),
    row("extend with an unknown schedule", (*TRAIN, "resume=auto", "train.extend=true"), "expected one of replan, restart"),
    # starting from an adapter
    row("init_from missing", (*TRAIN, "init_from={tmp}/nope"), "init_from={tmp}/nope: not found"),
    row("init_from a file", (*TRAIN, "init_from={tmp}/f"), "init_from={tmp}/f is a file", file("f", "x")),
    row("init_from a folder that is no adapter", (*TRAIN, "init_from={tmp}/e"), "init_from={tmp}/e is not a mode run folder", file("e/notes.txt", "hi")),
    row("init_from a model folder", (*TRAIN, "init_from={tmp}/m"), "is a model folder, not an adapter", file("m/config.json", "{}")),
    row("init_from an adapter without weights", (*TRAIN, "init_from={tmp}/a"), "the adapter folder holds no weights", file("a/adapter_config.json", "{}")),
    row("init_from a truncated adapter", (*TRAIN, "init_from={copy}"), "{copy}/adapter/adapter_model.safetensors is damaged", damaged(truncate("adapter/adapter_model.safetensors", 100))),
    row("init_from adapter_config.json not JSON", (*TRAIN, "init_from={copy}/adapter"), "{copy}/adapter/adapter_config.json: not valid JSON", damaged(overwrite("adapter/adapter_config.json", "{"))),
    row("init_from a truncated checkpoint", (*TRAIN, f"init_from={{copy}}/{LAST}"), f"{LAST}/adapter.safetensors", damaged(truncate(f"{LAST}/adapter.safetensors", 100))),
    row("init_from a run without final adapter", (*TRAIN, "init_from={copy}"), ("has no final adapter", f"init_from={{copy}}/{LAST}"), damaged(remove_tree("adapter"))),
    row("init_from another adapter type", (*TRAIN, "init_from={copy}/adapter"), "the source is a IA3 adapter", damaged(edit_json("adapter/adapter_config.json", lambda c: c.update(peft_type="IA3")))),
    row("init_from another base and rank", (*TRAIN, "init_from={run}", "model=tiny-qwen2", "adapter.r=4"), ("base model: the source was trained on tiny:llama", "adapter.r: 8 in the source, 4")),
    row("resume an old release's truncated checkpoint", (*RESUME_OLD, "resume={old}/checkpoints/step-000004"), "step-000004/adapter.safetensors", old_run(truncate("checkpoints/step-000004/adapter.safetensors", 99))),
    # run folders
    row("eval: truncated MoDE head", ("eval", "checkpoint={copy}"), "{copy}/mode_head.safetensors", damaged(truncate("mode_head.safetensors", 7))),
    row("eval: truncated adapter", ("eval", "checkpoint={copy}"), "{copy}/adapter/adapter_model.safetensors", damaged(truncate("adapter/adapter_model.safetensors", 100))),
    row("generate: truncated MoDE head", ("generate", "checkpoint={copy}", "prompt=hi"), "{copy}/mode_head.safetensors", damaged(truncate("mode_head.safetensors", 7))),
    row("chat: truncated adapter", ("chat", "checkpoint={copy}"), "{copy}/adapter/adapter_model.safetensors", damaged(truncate("adapter/adapter_model.safetensors", 100))),
    row("eval: MoDE head of another model", ("eval", "checkpoint={copy}"), "{copy}/mode_head.safetensors does not hold", damaged(other_tensors("mode_head.safetensors"))),
    row("eval: mode_head.json not JSON", ("eval", "checkpoint={copy}"), "{copy}/mode_head.json: not valid JSON", damaged(overwrite("mode_head.json", "{"))),
    row("eval: mode_head.json of something else", ("eval", "checkpoint={copy}"), "{copy}/mode_head.json does not describe a MoDE head", damaged(overwrite("mode_head.json", "{}"))),
    row("eval: mode_head.json layers not a list", ("eval", "checkpoint={copy}"), "{copy}/mode_head.json is damaged: layers is 5", damaged(edit_json("mode_head.json", lambda h: h.update(layers=5)))),
    row("eval: mode_head.json hidden_size as text", ("eval", "checkpoint={copy}"), "{copy}/mode_head.json is damaged: hidden_size is '8'", damaged(edit_json("mode_head.json", lambda h: h.update(hidden_size="8")))),
    row("eval: mode_head.json missing", ("eval", "checkpoint={copy}"), "has no mode_head.json", damaged(remove("mode_head.json"))),
    row("eval: adapter_config.json not JSON", ("eval", "checkpoint={copy}"), "{copy}/adapter/adapter_config.json", damaged(overwrite("adapter/adapter_config.json", "{"))),
    row("eval: adapter missing", ("eval", "checkpoint={copy}"), "no trained adapter", damaged(remove("adapter/adapter_config.json"))),
    row("eval: config.yaml not YAML", ("eval", "checkpoint={copy}"), "{copy}/config.yaml, line 2", damaged(overwrite("config.yaml", "model: [\n"))),
    row("eval: config.yaml not UTF-8", ("eval", "checkpoint={copy}"), "{copy}/config.yaml: not UTF-8 text", damaged(overwrite("config.yaml", b"recipe: caf\xe9\n"))),
    row("eval: a foreign folder", ("eval", "checkpoint={tmp}/x"), "{tmp}/x is not a mode run folder", file("x/notes.txt", "hi")),
    row("eval: merged model truncated", ("eval", "checkpoint={old}/merged"), "{old}/merged/model.safetensors", old_run(truncate("merged/model.safetensors", 1000))),
    row("generate: merged head truncated", ("generate", "checkpoint={old}/merged", "prompt=hi"), "{old}/merged/mode_head.safetensors", old_run(truncate("merged/mode_head.safetensors", 20))),
    row("generate: a plain model folder", ("generate", "checkpoint={tmp}/m", "prompt=hi"), "not one written by mode", file("m/config.json", "{}")),
    row("generate: a file", ("generate", "checkpoint={tmp}/f", "prompt=hi"), "a file", file("f", "")),
]
# fmt: on


# ---------------------------------------------------------------------------- running a row


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory, model_cache) -> Path:
    """A finished tiny run with two checkpoints, made once for every row."""
    from mode_cli.cli import main

    out = tmp_path_factory.mktemp("bad-inputs") / "run"
    assert main(["train", *RUN, f"output_dir={out}"]) == 0
    return out


def snapshot(*folders: Path) -> dict[str, str]:
    """Every file and folder under `folders`: a folder by its name, a file by its bytes' digest."""
    seen = {}
    for top in folders:
        for path in sorted(top.rglob("*")):
            key = str(path)
            if path.is_symlink():
                seen[key] = f"link to {os.readlink(path)}"
            elif path.is_dir():
                seen[key] = "folder"
            else:
                seen[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return seen


@pytest.mark.parametrize(("args", "says", "setup"), ROWS)
def test_bad_input(mode, tmp_path, monkeypatch, shared_run, args, says, setup):
    for step in setup:
        step(tmp_path, shared_run)
    monkeypatch.chdir(tmp_path)  # a default output folder would land here, and be seen
    names = {"tmp": tmp_path, "run": shared_run, "copy": tmp_path / "run", "old": tmp_path / "old"}
    before = snapshot(tmp_path, shared_run)

    code, out, err = mode(*(word.format(**names) for word in args))

    printed = " ".join((out + err).split())  # off a terminal, rich wraps long lines
    assert "Traceback" not in printed
    assert code == 2, printed
    assert printed.count("error:") == 1 and len(printed) < 2_000, printed
    for words in says:
        assert words.format(**names) in printed
    assert snapshot(tmp_path, shared_run) == before, "something was written or changed"


def test_the_table_covers_every_kind():
    assert len(ROWS) >= 30
    assert len({p.id for p in ROWS}) == len(ROWS)
