"""The package's shape: the method core stands alone, imports form no cycle, every choice a recipe
offers is implemented, each rule is written once, and the docs a docstring cites exist."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import run_command

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "mode_cli"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def in_core(name: str) -> bool:
    """Whether a module is part of the method core, the `mode_cli.mode` package."""
    return name == "mode_cli.mode" or name.startswith("mode_cli.mode.")


def imports_of(path: Path) -> set[str]:
    """Every mode_cli module `path` imports, at module level or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from mode_cli.data import splits` imports the module mode_cli.data.splits.
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in MODULES}
    return found


def test_the_import_graph_has_no_cycle():
    graph = {name: imports_of(path) - {name} for name, path in MODULES.items()}
    # A package's __init__ is imported before its modules; an edge into a package that only
    # re-exports nothing does not make a cycle by itself, so packages count like modules here.
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt) :] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_the_cycle_check_finds_a_cycle(tmp_path, monkeypatch):
    """The walker above sees imports inside functions too (they form cycles all the same)."""
    a = tmp_path / "a.py"
    a.write_text("def f():\n    from mode_cli.cli import main\n")
    assert imports_of(a) == {"mode_cli.cli"}
    b = tmp_path / "b.py"
    b.write_text("from mode_cli.data import splits\n")
    assert imports_of(b) == {"mode_cli.data", "mode_cli.data.splits"}


def test_the_method_core_imports_nothing_of_the_command_line():
    core = [name for name in MODULES if in_core(name)]
    code = (
        "import sys\n"
        + "".join(f"import {name}\n" for name in core)
        + "import mode_cli.mode as m\n"
        + "m.MoDEHead, m.chunked_mode_loss, m.loss_weights, m.method_of\n"
        + "bad = [n for n in ('omegaconf', 'hydra', 'rich', 'transformers', 'peft', 'mode_cli.cli')"
        + " if n in sys.modules]\n"
        + "print(','.join(bad))\n"
    )
    result = run_command([sys.executable, "-c", code], timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


def test_the_method_core_depends_only_on_torch_and_itself():
    for name, path in MODULES.items():
        if not in_core(name):
            continue
        outside = {m for m in imports_of(path) if not in_core(m)}
        assert not outside, f"{name} imports {outside}"


# ---------------------------------------------------------------------------- choices


def implemented(tmp_path: Path):
    """For each key with choices, a check that runs the implementation with one value."""
    import torch

    from mode_cli.data.formats import FORMAT_FIELDS
    from mode_cli.devices import resolve_device
    from mode_cli.eval.answers import NORMALISERS, answer_rows
    from mode_cli.mode.head import MoDEHead
    from mode_cli.mode.loss import IMPLEMENTATIONS
    from mode_cli.mode.methods import method_of
    from mode_cli.mode.selection import select_layers
    from mode_cli.mode.terms import LossWeights
    from mode_cli.mode.weighting import SCALES, curriculum
    from mode_cli.models.loading import compute_dtype
    from mode_cli.models.merging import MERGE_DTYPES
    from mode_cli.train.optim import lr_lambda, optimizer_on
    from mode_cli.train.progress import MetricsLog, WandbRun

    class Layers:
        select, k, every, of_last, fraction, indices = "last_k", 2, 2, 4, 0.5, None

    def router(kind):
        MoDEHead(torch.nn.LayerNorm(4), [3, 4], 4, 4, router=kind)

    def selection(select):
        layers = Layers()
        layers.select = select
        assert select_layers(layers, 4)[-1] == 4

    def logger(kind):
        from omegaconf import OmegaConf

        from mode_cli.config import RecipeConfig

        out = tmp_path / kind
        out.mkdir()
        tracker = WandbRun(OmegaConf.structured(RecipeConfig), out) if kind == "wandb" else None
        log = MetricsLog(out, kind, tracker=tracker)
        log.write({"step": 1, "loss": 1.0})
        log.close()
        if tracker is not None:
            tracker.finish()
            assert list(out.glob("wandb/offline-run-*/run-*.wandb"))

    def answers(mode):
        from omegaconf import OmegaConf

        from mode_cli.config import RecipeConfig

        cfg = OmegaConf.structured(RecipeConfig)
        cfg.eval.answers = mode
        cfg.data.train = cfg.data.eval = "bundled:arithmetic/eval.jsonl"
        answer_rows(cfg)

    return {
        "model.quantization": lambda v: v in ("nf4", "none"),
        "data.format": lambda v: FORMAT_FIELDS[v],
        "data.on_bad_row": lambda v: v in ("error", "skip"),
        # Both policies are run against a naive reference in tests/test_data_cache.py.
        "data.dedup": lambda v: v in ("none", "exact"),
        "layers.select": selection,
        "router.kind": router,
        "router.init": lambda v: MoDEHead(
            torch.nn.LayerNorm(4), [4], 4, 4, init_final_weight=0.9 if v == "final" else None
        ),
        "router.input": lambda v: MoDEHead(torch.nn.LayerNorm(4), [3, 4], 4, 4, router_input=v),
        "loss.name": method_of,
        "loss.teacher": lambda v: LossWeights(teacher=v),
        "loss.scale": lambda v: SCALES[v](3),
        "loss.curriculum": lambda v: curriculum(3, v, 1, 10, 1),
        "loss.impl": lambda v: IMPLEMENTATIONS[v],
        "train.device": resolve_device,
        "train.precision": compute_dtype,
        "train.optimizer": lambda v: optimizer_on(v, "cuda", False),
        "train.lr_schedule": lambda v: lr_lambda(2, 10, 0.1, v)(5),
        "train.on_nonfinite": lambda v: v in ("stop", "skip"),
        # Both strategies are trained for real in tests/test_distributed.py.
        "distributed.strategy": lambda v: v in ("ddp", "fsdp"),
        "logger": logger,
        "merge.base": lambda v: v in ("dequantized", "original"),
        "merge.dtype": lambda v: v == "auto" or MERGE_DTYPES[v],
        "eval.answers": answers,
        "eval.answer_match": lambda v: NORMALISERS[v]("The answer is 4"),
    }


def test_every_choice_is_implemented(tmp_path):
    from mode_cli.config import choices

    checks = implemented(tmp_path)
    assert set(checks) == set(choices()), "a choice key without a check here, or the reverse"
    for key, values in choices().items():
        assert values, key
        for value in values:
            assert checks[key](value) is not False, f"{key}={value} is not implemented"


def test_a_choice_list_lives_next_to_its_implementation():
    """`config.choices` gathers lists defined elsewhere: a value added there is offered here."""
    from mode_cli.config import choices
    from mode_cli.mode.methods import METHODS
    from mode_cli.mode.weighting import SCALES

    assert choices()["loss.name"] == tuple(METHODS)
    assert choices()["loss.scale"] == tuple(SCALES)


# ---------------------------------------------------------------------------- one definition


def package_sources():
    return {name: path.read_text() for name, path in MODULES.items()}


def test_the_method_is_read_from_the_method_table_only():
    """Deciding by `loss.name` happens in mode/methods.py; elsewhere the table's row is read."""
    compares = re.compile(r"loss(_cfg)?\.name\s*(==|!=|\bin\b|\bnot in\b)")
    offenders = [name for name, text in package_sources().items() if compares.search(text)]
    assert offenders == []


def test_the_methods_say_what_they_train_and_decode():
    from mode_cli.mode.methods import METHODS

    for method in METHODS.values():
        assert method.heads == (("ensemble", "final") if method.routed else ("final",))
        assert (method.why_no_ensemble() is None) == method.routed
        assert method.trains_head or not method.routed
    assert not METHODS["final-only"].trains_head and not METHODS["mode-only"].trains_adapter
    assert "head=final" in METHODS["layerwise"].why_no_ensemble()


def test_library_code_prints_nothing_itself():
    """Only the command layer owns a console; the libraries log (mode_cli.console)."""
    printers = re.compile(r"Console\(|\bprint\(")
    library = ("mode_cli.mode.", "mode_cli.models.", "mode_cli.data.", "mode_cli.artifacts")
    offenders = [
        name
        for name, text in package_sources().items()
        if name.startswith(library) and printers.search(text)
    ]
    assert offenders == []
    consoles = [n for n, text in package_sources().items() if "Console(" in text]
    assert consoles == ["mode_cli.console"]


def test_docstrings_cite_sections_that_exist():
    """`docs/method.md`, "Section" in the package names a heading of docs/method.md."""
    headings = {
        line.lstrip("#").strip()
        for line in (REPO / "docs" / "method.md").read_text().splitlines()
        if line.startswith("#")
    }
    cited = []
    for name, text in package_sources().items():
        flat = " ".join(line.strip() for line in text.splitlines())
        assert "METHOD.md" not in text, f"{name} cites METHOD.md, which is not in the repository"
        for match in re.finditer(r"docs/method\.md`?,?\s*\"([^\"]+)\"", flat):
            cited.append((name, match.group(1)))
    assert cited, "no citation found: the pattern above is stale"
    missing = [(name, section) for name, section in cited if section not in headings]
    assert missing == []


def test_the_readme_maps_every_subpackage():
    readme = (REPO / "README.md").read_text()
    development = readme[readme.index("## Development") :]
    for path in sorted(PACKAGE.glob("*/__init__.py")):
        assert f"`mode_cli/{path.parent.name}/`" in development, path.parent.name


def test_subprocess_helper_kills_the_whole_group_on_timeout(tmp_path):
    marker = tmp_path / "grandchild-alive"
    grandchild = f"import time; time.sleep(3); open({str(marker)!r}, 'w').close()"
    script = tmp_path / "parent.py"
    script.write_text(
        "import subprocess, sys, time\n"
        f"subprocess.Popen([sys.executable, '-c', {grandchild!r}])\n"
        "time.sleep(60)\n"
    )
    with pytest.raises(subprocess.TimeoutExpired):
        run_command([sys.executable, str(script)], timeout=2)
    time.sleep(4)
    assert not marker.exists(), "a grandchild outlived the timeout"
