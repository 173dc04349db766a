"""Recipes: finding them, listing them and composing one with overrides through Hydra's Compose API.

A recipe is a YAML file whose defaults list picks one option from each config group. The shipped
recipes live in the repository's `recipes/` folder; a user's own recipe (`recipe=path/to/x.yaml`,
or `--recipes-dir DIR`) is composed with the shipped groups on its search path, so it can use
them and add groups of its own. The Compose API writes no output folders and leaves the working
directory alone.
"""

from __future__ import annotations

import shutil
from dataclasses import fields, is_dataclass
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, open_dict
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError
from yaml import YAMLError

from mode_cli.config import RecipeConfig, register_schema
from mode_cli.errors import ModeError
from mode_cli.files import check_writable_folder, read_text, read_yaml, yaml_problem

GROUPS = ("model", "data", "adapter", "layers", "router", "loss", "train", "eval")
AUTO_MICRO_BATCH = "train.micro_batch_size=auto"


def shipped_recipes_dir() -> Path:
    """The recipes that come with `mode`: the repo's `recipes/` (source checkout or editable
    install), else the copy a wheel installs as `mode_cli/shipped_recipes`."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "recipes", here / "shipped_recipes"):
        if (candidate / "model").is_dir():
            return candidate
    raise ModeError(f"mode's recipes folder is missing (looked in {here / 'shipped_recipes'})")


def recipe_files(directory: Path) -> dict[str, Path]:
    """Top-level recipes in a folder: every *.yaml file directly inside it, by name."""
    return {p.stem: p for p in sorted(directory.glob("*.yaml"))}


def description(path: Path) -> str:
    """A recipe's one-line description: the first comment line of its file."""
    for line in read_text(path).splitlines():
        stripped = line.strip()
        if stripped.startswith("#") and not stripped.startswith("# @package"):
            return stripped.lstrip("#").strip()
        if stripped:
            break
    return ""


def group_options(directory: Path) -> dict[str, list[str]]:
    """Options of each config group: the YAML files in each group folder."""
    return {
        group: sorted(p.stem for p in (directory / group).glob("*.yaml"))
        for group in GROUPS
        if (directory / group).is_dir()
    }


def locate(recipe: str, recipes_dir: Path | None = None) -> tuple[Path, str]:
    """Where a recipe lives: (config folder, recipe name). `recipe` is a name or a path to YAML."""
    if recipe.endswith(".yml"):
        raise ModeError(f"Recipe files must end in .yaml (Hydra reads no other): {recipe}")
    if recipe.endswith(".yaml"):
        path = Path(recipe).expanduser().resolve()
        if path.is_dir():
            raise ModeError(f"{recipe} is a folder, not a recipe file")
        if not path.is_file():
            raise ModeError(f"Recipe file not found: {recipe}")
        return path.parent, path.stem
    # A user's folder first, then the shipped recipes (also reachable with --recipes-dir).
    folders = [shipped_recipes_dir().resolve()]
    if recipes_dir is not None:
        if recipes_dir.exists() and not recipes_dir.is_dir():
            raise ModeError(f"--recipes-dir {recipes_dir}: {recipes_dir} is a file, not a folder")
        if not recipes_dir.is_dir():
            raise ModeError(f"Recipes folder not found: {recipes_dir}")
        folders.insert(0, recipes_dir.resolve())
    for folder in folders:
        if recipe in recipe_files(folder):
            return folder, recipe
    available = sorted({name for folder in folders for name in recipe_files(folder)})
    raise ModeError(
        f"Unknown recipe '{recipe}'. Available recipes: {', '.join(available)}\n"
        "(`mode recipes` lists them with descriptions; `recipe=path/to/recipe.yaml` runs your own)"
    )


def compose_recipe(
    recipe: str, overrides: list[str] | None = None, recipes_dir: Path | None = None
) -> DictConfig:
    """Compose a recipe with command-line overrides into a typed, validated-by-schema config."""
    register_schema()
    config_dir, name = locate(recipe, recipes_dir)
    check_recipe_file(config_dir / f"{name}.yaml")
    overrides = [merge_shorthand(item) for item in overrides or []]
    # `train.micro_batch_size=auto` over a recipe's number keeps the recipe's batch: composed
    # without it first, the number gives `train.batch_size`.
    auto = [item for item in overrides if item.replace(" ", "") == AUTO_MICRO_BATCH]
    overrides = [item for item in overrides if item not in auto]
    shipped = shipped_recipes_dir().resolve()
    if config_dir != shipped:
        overrides.append(f"hydra.searchpath=[file://{shipped}]")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base=None):
            cfg = compose(config_name=name, overrides=overrides)
    except (MissingConfigException, ConfigCompositionException, OverrideParseException) as err:
        raise ModeError(explain_composition_error(err)) from None
    except (ValidationError, ConfigAttributeError, ConfigKeyError) as err:
        # Raised while merging the recipe's own files against the schema.
        raise ModeError(f"In recipe '{name}': {explain_omegaconf_error(err)}") from None
    except YAMLError as err:
        # A config group file of the recipe's (the recipe itself was checked above).
        mark = getattr(err, "problem_mark", None)
        where = mark.name if mark is not None else f"a YAML file under {config_dir}"
        raise ModeError(f"{where}, {yaml_problem(err)}") from None
    except UnicodeDecodeError:
        # Hydra does not say which file: find it among the group files it composed from.
        for path in sorted(config_dir.glob("*/*.yaml")):
            read_text(path)
        raise ModeError(f"a recipe file under {config_dir} is not UTF-8 text") from None
    finally:
        GlobalHydra.instance().clear()
    if "hydra" in cfg:
        with open_dict(cfg):
            del cfg["hydra"]
    if not isinstance(cfg._metadata.object_type, type) or cfg._metadata.object_type is dict:
        raise ModeError(
            f"Recipe '{name}' does not build on the schema: its defaults list must start with "
            "`- base` (see `mode recipes show tiny-llama-alpaca`)"
        )
    with open_dict(cfg):
        cfg.recipe = name
    if auto:
        train = cfg.train
        if train.batch_size is None and isinstance(train.micro_batch_size, int):
            train.batch_size = train.micro_batch_size * train.grad_accum_steps
        train.micro_batch_size = "auto"
    return cfg


def check_recipe_file(path: Path) -> None:
    """A recipe file must be UTF-8 YAML holding a mapping: said with its path (and the line and
    column of a syntax error) before Hydra reads it."""
    if not isinstance(read_yaml(path), DictConfig):
        raise ModeError(
            f"{path} is not a recipe: it holds a list, not a mapping of keys (start from "
            "`mode recipes cp tiny-llama-alpaca my-recipe.yaml`)"
        )


def merge_shorthand(override: str) -> str:
    """`merge=false` / `merge=true` stand for `merge.enabled=...`; other overrides pass through.

    `merge` is a group of keys (enabled, head, base, dtype), so the bare boolean is rewritten before
    Hydra sees it; any other bare value is refused with the keys it could have meant.
    """
    key, sep, value = override.partition("=")
    if not sep or key.lstrip("+") != "merge":
        return override
    if value.strip().lower() in ("true", "false"):
        return f"{key}.enabled={value.strip().lower()}"
    raise ModeError(
        f"{override}: expected merge=true or merge=false "
        "(or merge.enabled=, merge.head=auto|ensemble|final, merge.base=dequantized|original, "
        "merge.dtype=auto|fp32|bf16|fp16)"
    )


def explain_composition_error(err: Exception) -> str:
    """Turn Hydra's composition errors into one message that names the key and what was expected."""
    # Hydra sometimes raises without `from`: the OmegaConf error is then the context.
    cause = err.__cause__ or err.__context__
    if isinstance(cause, ValidationError | ConfigAttributeError | ConfigKeyError):
        return explain_omegaconf_error(cause)
    message = str(err).split("\nConfig search path:")[0].strip()
    if isinstance(err, MissingConfigException) and "Available options" in message:
        return message.replace("\n\t", "\n  ").replace("Could not find", "No config option")
    if isinstance(err, OverrideParseException):
        return f"Could not parse an override: {message}"
    return message


def explain_omegaconf_error(err: Exception) -> str:
    """`train.lr: expected a float, got 'abc'`-style text from an OmegaConf error."""
    key = getattr(err, "full_key", None) or "?"
    first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
    if isinstance(err, ConfigAttributeError | ConfigKeyError):
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        known = known_keys(parent)
        where = f"in '{parent}'" if parent else "at the top level"
        message = f"Unknown config key '{key}'. Keys {where}: {', '.join(known)}"
        if key == "lora" or key.startswith("lora."):
            # The adapter's keys were called `lora` before they took the name of their group.
            message += f" (the adapter's keys are under `adapter`: {'adapter' + key[4:]})"
        return message
    if "is not a subclass of MergeConfig" in first_line:
        # A recipe file's `merge: false`: the shell shorthand has no YAML counterpart.
        return (
            "merge is a group of keys in a recipe file: write `merge: {enabled: false}` "
            "(keys: enabled, base, dtype)"
        )
    return f"Invalid value for '{key}': {first_line}"


def known_keys(dotted: str) -> list[str]:
    """The schema's field names under a dotted path ('' for the top level)."""
    node: object = RecipeConfig
    for part in filter(None, dotted.split(".")):
        match = [f for f in fields(node) if f.name == part] if is_dataclass(node) else []
        if not match:
            return []
        node = match[0].default_factory() if callable(match[0].default_factory) else None
    return [f.name for f in fields(node)] if is_dataclass(node) else []


def copy_recipe(name: str, destination: str, recipes_dir: Path | None = None) -> Path:
    """Copy a recipe out for editing; refuses to overwrite a file that exists."""
    directory, name = locate(name, recipes_dir)
    source = directory / f"{name}.yaml"
    target = Path(destination).expanduser()
    if target.is_dir():
        target = target / source.name
    if target.suffix != ".yaml":
        raise ModeError(f"Destination must be a folder or a .yaml file: {destination}")
    if target.exists():
        raise ModeError(f"Refusing to overwrite {target}: remove it or pick another path")
    check_writable_folder(target.parent, "destination")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return target
