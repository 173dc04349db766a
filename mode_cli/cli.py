"""The `mode` command line: argparse owns the subcommands, Hydra's Compose API the overrides.

    mode train recipe=NAME [key=value ...] [--dry-run] [--recipes-dir DIR]
    mode eval checkpoint=DIR [key=value ...]
    mode recipes | mode recipes show NAME [key=value ...] | mode recipes cp NAME PATH

Errors a user can cause (ModeError) print one message and exit 2; bugs still raise.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mode_cli import __version__
from mode_cli.errors import ModeError

EXIT_USER_ERROR = 2


def _quiet_libraries() -> None:
    """Keep third-party chatter (progress bars, advisory warnings) out of the terminal."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # The one-time GGUF conversion draws tqdm bars of its own; mode shows its own progress.
    os.environ.setdefault("TQDM_DISABLE", "1")
    import logging
    import warnings

    warnings.filterwarnings("ignore", module="bitsandbytes")
    # Deprecation notices from the libraries are for their callers' developers, not our users.
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="torch")
    warnings.filterwarnings("ignore", message=".*gemv_4bit.*")
    for name in ("bitsandbytes", "transformers", "peft", "datasets", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def split_overrides(args: list[str], key: str) -> tuple[str | None, list[str]]:
    """Pull `key=value` out of the override list (e.g. recipe=, checkpoint=)."""
    value, rest = None, []
    for arg in args:
        if arg.startswith(f"{key}="):
            value = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return value, rest


def groups_help() -> str:
    from mode_cli.recipes import group_options, recipe_files, shipped_recipes_dir

    directory = shipped_recipes_dir()
    lines = ["recipes: " + ", ".join(recipe_files(directory)), "", "config groups (group=option):"]
    for group, options in group_options(directory).items():
        lines.append(f"  {group:<8} {', '.join(options)}")
    lines += [
        "",
        "any value: key=value, e.g. train.lr=1e-4 layers=last4 loss=mode-nodistill",
        "see every key of a recipe: mode recipes show NAME",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mode",
        description="Mixture-of-Depths Ensemble (MoDE) finetuning: QLoRA + a learned ensemble of "
        "the last layers.",
        epilog="Start with: mode recipes, then mode train recipe=tiny-llama-alpaca",
    )
    parser.add_argument("--version", action="version", version=f"mode {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = sub.add_parser(
        "train",
        help="finetune a model with a recipe",
        description="Finetune with a recipe. Overrides are Hydra's key=value syntax.",
        epilog=groups_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("overrides", nargs="*", metavar="recipe=NAME key=value")
    train.add_argument(
        "--dry-run", action="store_true", help="validate and show the data; no training"
    )
    train.add_argument("--recipes-dir", type=Path, help="a folder of your own recipes")

    evaluate = sub.add_parser(
        "eval",
        help="per-layer report of a finished run",
        description="Write and print the per-layer report (base vs tuned) of a run folder.",
    )
    evaluate.add_argument("overrides", nargs="*", metavar="checkpoint=DIR key=value")

    recipes = sub.add_parser("recipes", help="list, show or copy recipes")
    recipes.add_argument("action", nargs="?", choices=["list", "show", "cp"], default="list")
    recipes.add_argument("args", nargs="*", metavar="NAME [overrides] | NAME PATH")
    recipes.add_argument("--recipes-dir", type=Path, help="a folder of your own recipes")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from rich.console import Console

    console = Console(stderr=True)
    try:
        _quiet_libraries()
        if args.command == "train":
            return cmd_train(args)
        if args.command == "eval":
            return cmd_eval(args)
        return cmd_recipes(args)
    except ModeError as err:
        from rich.text import Text

        # soft_wrap: a message piped to a log stays on its own lines, not cut at 80 columns.
        console.print(Text.assemble(("error:", "bold red"), " ", str(err)), soft_wrap=True)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        console.print("interrupted")
        return 130


def cmd_train(args: argparse.Namespace) -> int:
    from mode_cli.recipes import compose_recipe
    from mode_cli.train import FinetuneRecipe, dry_run

    recipe, overrides = split_overrides(args.overrides, "recipe")
    if recipe is None:
        raise ModeError("mode train needs recipe=NAME (`mode recipes` lists them)")
    cfg = compose_recipe(recipe, overrides, args.recipes_dir)
    if args.dry_run:
        dry_run(cfg)
    else:
        FinetuneRecipe(cfg).run()
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from mode_cli.evaluate import run_eval

    checkpoint, overrides = split_overrides(args.overrides, "checkpoint")
    if checkpoint is None:
        raise ModeError("mode eval needs checkpoint=DIR (a run folder written by mode train)")
    run_eval(Path(checkpoint), overrides)
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf
    from rich.console import Console
    from rich.table import Table

    from mode_cli.recipes import (
        compose_recipe,
        copy_recipe,
        description,
        recipe_files,
        shipped_recipes_dir,
    )

    out = Console()
    if args.action == "list":
        directory = args.recipes_dir or shipped_recipes_dir()
        table = Table("recipe", "description", title=f"recipes in {directory}")
        for name, path in recipe_files(directory).items():
            table.add_row(name, description(path))
        out.print(table)
        return 0
    if not args.args:
        raise ModeError(f"mode recipes {args.action} needs a recipe name")
    if args.action == "show":
        cfg = compose_recipe(args.args[0], args.args[1:], args.recipes_dir)
        from mode_cli.config import validate

        validate(cfg, check_hardware=False)
        sys.stdout.write(OmegaConf.to_yaml(cfg, resolve=True))
        return 0
    if len(args.args) != 2:
        raise ModeError("usage: mode recipes cp NAME PATH")
    target = copy_recipe(args.args[0], args.args[1], args.recipes_dir)
    out.print(f"copied {args.args[0]} to {target}; run it with: mode train recipe={target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
