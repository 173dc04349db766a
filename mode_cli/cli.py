"""The `mode` command line: argparse owns the subcommands, Hydra's Compose API the overrides.

    mode train recipe=NAME [key=value ...] [--dry-run [--memory SIZE]] [--recipes-dir DIR]
    mode plan recipe=NAME [key=value ...] [--memory SIZE] [--json]
    mode train -m recipe=NAME key=a,b [key=value ...]      (a sweep: every combination in turn)
    mode eval checkpoint=DIR [key=value ...]
    mode generate checkpoint=DIR prompt=TEXT [head=ensemble|final] [max_new_tokens=N ...]
    mode chat checkpoint=DIR [head=ensemble|final ...]
    mode export checkpoint=DIR out=DIR [head=ensemble|final] [dtype=bf16|fp16|fp32] [base=...]
    mode recipes | mode recipes show NAME [key=value ...] | mode recipes cp NAME PATH
    mode cache | mode cache clear

Errors a user can cause (ModeError) print one message and exit 2; bugs still raise.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mode_cli import __version__
from mode_cli.errors import ModeError
from mode_cli.options import TEXT, parse_options


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


MEMORY_HELP = (
    "the memory budget the plan checks, such as 12GB, 24GiB or 512MB (GB means 2^30 bytes; "
    "default: this machine's GPU, else its RAM)"
)


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
        "--dry-run",
        action="store_true",
        help="validate, show the data and the memory plan; no training",
    )
    train.add_argument("--memory", metavar="SIZE", help=f"with --dry-run: {MEMORY_HELP}")
    train.add_argument("--recipes-dir", type=Path, help="a folder of your own recipes")
    train.add_argument(
        "-m",
        "--multirun",
        action="store_true",
        help="sweep: run every combination of comma-separated values (loss=mode,final-only "
        "train.lr=1e-4,2e-4; also range(...), choice(...), glob(...)), one after another, "
        "then write a comparison table",
    )

    plan = sub.add_parser(
        "plan",
        help="will a recipe fit? its peak memory, planned from the model's config alone",
        description="The memory a recipe's training needs at its peak, line by line (4-bit\n"
        "weights, unquantized layers, adapter, gradients, optimizer states, activations, the\n"
        "loss's logits chunk, runtime), planned from the recipe and the model's config.json:\n"
        "no weights are loaded. With a budget: whether it fits, by how much, and what to\n"
        "change when it does not. Exit code 1 when it does not fit. See docs/memory.md.",
        epilog="e.g. mode plan recipe=llama3-8b-alpaca --memory 12GB\n"
        "     mode plan recipe=smollm2-arithmetic train.micro_batch_size=auto --memory 2GB",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    plan.add_argument("overrides", nargs="*", metavar="recipe=NAME key=value")
    plan.add_argument("--memory", metavar="SIZE", help=MEMORY_HELP)
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.add_argument("--recipes-dir", type=Path, help="a folder of your own recipes")

    evaluate = sub.add_parser(
        "eval",
        help="per-layer report and answer accuracy of a run, merged model or model",
        description="Write and print the eval report: every layer's loss, perplexity and top-1 "
        "(logit lens), the MoDE ensemble and router, base vs tuned, and the exact-match accuracy "
        "of answers decoded with the ensemble and the final head. Files: "
        "<checkpoint>/eval/<time>/report.json, report.md, layers.png.",
        epilog="checkpoint=DIR: a run folder (mode train), a merged model folder, or a plain "
        "model (a folder, a hub id, package:smollm2: a base-only report, logit lens and answers)\n"
        "data=NAME         another data group (recipes/data/NAME.yaml), e.g. data=arithmetic\n"
        "examples=N        evaluate N eval examples\n"
        "compare=base|none also evaluate the base before tuning (default: on for run folders)\n"
        "eval.answers=auto|on|off, eval.answer_field=answer, eval.answer_match=number|exact|"
        "choice, eval.max_new_tokens=64, and any recipe key=value",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    evaluate.add_argument("overrides", nargs="*", metavar="checkpoint=DIR key=value")

    generate = sub.add_parser(
        "generate",
        help="stream a completion from a finished run",
        description="Stream the model's answer to one prompt, in the run's prompt format. "
        "Options: prompt=TEXT (required), head=ensemble|final, max_new_tokens=N, "
        "temperature=T (0: greedy, the default), seed=N.",
    )
    generate.add_argument("overrides", nargs="*", metavar="checkpoint=DIR prompt=TEXT key=value")

    chat = sub.add_parser(
        "chat",
        help="chat with a finished run in the terminal",
        description="An interactive conversation; /exit, Ctrl-D or Ctrl-C ends it, /reset "
        "forgets the conversation. Options: head=ensemble|final, max_new_tokens=N, "
        "temperature=T, seed=N.",
    )
    chat.add_argument("overrides", nargs="*", metavar="checkpoint=DIR key=value")

    cached = sub.add_parser(
        "cache",
        help="show or clear the tokenized-data cache",
        description="The checked and tokenized rows kept between runs (data.cache=true), so a "
        "run with the same data, tokenizer, chat template and max_seq_len starts without "
        "tokenizing. `mode cache` lists the entries; `mode cache clear` removes them all.",
    )
    cached.add_argument("action", nargs="?", choices=["show", "clear"], default="show")

    export = sub.add_parser(
        "export",
        help="a finished run as a model folder to deploy (transformers, lm-eval, vLLM)",
        description="Write a run's model into a new folder: the adapter merged in, the tokenizer "
        "with the run's prompt format as chat template, a generation config that stops at the "
        "end of a turn, and a model card. head=ensemble (the default for a run with a router) "
        "writes the MoDE model, which transformers loads with trust_remote_code=True; "
        "head=final a plain model of the base family, predicting from its final layer.",
        epilog="checkpoint=DIR  a run folder written by mode train (or its merged/ folder)\n"
        "out=DIR         a new or empty folder\n"
        "head=ensemble|final, dtype=bf16|fp16|fp32 (default: the run's merge.dtype), "
        "base=dequantized|original (default: the run's merge.base)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    export.add_argument("overrides", nargs="*", metavar="checkpoint=DIR out=DIR key=value")

    recipes = sub.add_parser("recipes", help="list, show or copy recipes")
    recipes.add_argument("action", nargs="?", choices=["list", "show", "cp"], default="list")
    recipes.add_argument("args", nargs="*", metavar="NAME [overrides] | NAME PATH")
    recipes.add_argument("--recipes-dir", type=Path, help="a folder of your own recipes")
    return parser


def attach_sizes(argv: list[str]) -> list[str]:
    """`--memory -1GB` as `--memory=-1GB`: argparse would read a value starting with `-` as an
    option and answer that --memory lacks its argument, where the budget itself is wrong."""
    words: list[str] = []
    for word in argv:
        if words and words[-1] == "--memory" and word.startswith("-"):
            words[-1] = f"--memory={word}"
        else:
            words.append(word)
    return words


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(attach_sizes(sys.argv[1:] if argv is None else argv))
    if args.command is None:
        parser.print_help()
        return 0
    from mode_cli.console import console, show_library_messages

    try:
        _quiet_libraries()
        show_library_messages()
        if args.command == "train":
            return cmd_train(args)
        if args.command == "plan":
            return cmd_plan(args)
        if args.command == "eval":
            return cmd_eval(args)
        if args.command in ("generate", "chat"):
            return cmd_generate(args)
        if args.command == "cache":
            return cmd_cache(args)
        if args.command == "export":
            return cmd_export(args)
        return cmd_recipes(args)
    except ModeError as err:
        from rich.text import Text

        # Every rank of a torchrun job reports its own error (rank 0's console alone is not quiet).
        rank = os.environ.get("RANK", "0") if os.environ.get("WORLD_SIZE", "1") != "1" else "0"
        where = f"rank {rank}: " if rank != "0" else ""
        quiet, console.quiet = console.quiet, False
        # soft_wrap: a message piped to a log stays on its own lines, not cut at 80 columns.
        console.print(Text.assemble((f"{where}error:", "bold red"), " ", str(err)), soft_wrap=True)
        console.quiet = quiet
        return err.exit_code
    except KeyboardInterrupt as err:
        # Training stops after a step with a checkpoint and says how to resume (TrainingInterrupted:
        # 130 for Ctrl-C, 143 for SIGTERM); anywhere else an interrupt just ends the command.
        console.print(str(err) or "interrupted", soft_wrap=True, highlight=False)
        return getattr(err, "exit_code", 130)


def cmd_train(args: argparse.Namespace) -> int:
    from mode_cli.recipes import compose_recipe
    from mode_cli.train.distributed import launched_by_torchrun
    from mode_cli.train.recipe import FinetuneRecipe, dry_run

    if args.memory is not None and args.multirun:
        raise ModeError(
            "--memory plans one run: a sweep's --dry-run lists its runs, not their memory; "
            "plan one with `mode plan recipe=NAME [key=value ...] --memory SIZE`, or give the "
            "sweep's runs train.memory_budget=SIZE with train.micro_batch_size=auto"
        )
    if args.multirun:
        if launched_by_torchrun():
            raise ModeError(
                "a sweep (-m) runs its runs one after another in one process: start it "
                "without torchrun, and give each run distributed.nproc=N instead"
            )
        return cmd_sweep(args)
    values, overrides = parse_options(args.overrides, {"recipe": TEXT}, rest_allowed=True)
    recipe = values.get("recipe")
    if recipe is None:
        raise ModeError("mode train needs recipe=NAME (`mode recipes` lists them)")
    cfg = compose_recipe(recipe, overrides, args.recipes_dir)
    if args.memory is not None and not args.dry_run:
        raise ModeError(
            "--memory goes with --dry-run (the plan's budget); a run's own budget is "
            "train.memory_budget=SIZE, with train.micro_batch_size=auto"
        )
    if args.dry_run:
        if launched_by_torchrun():
            from mode_cli.console import console

            console.quiet = os.environ.get("RANK", "0") != "0"  # one rank shows the dry run
        dry_run(cfg, memory=args.memory)
    elif launched_by_torchrun():
        return train_rank(cfg, overrides, args.recipes_dir)
    elif cfg.distributed.nproc > 1:
        return launch_ranks(cfg, recipe, overrides, args.recipes_dir)
    else:
        FinetuneRecipe(cfg, overrides, args.recipes_dir).run()
    return 0


def train_rank(cfg, overrides: list[str], recipes_dir: Path | None) -> int:
    """This process is one rank of a torchrun job: join it, train, leave it."""
    from mode_cli.console import console
    from mode_cli.devices import resolve_device
    from mode_cli.models.loading import resolve_source
    from mode_cli.train.distributed import close_world, init_world
    from mode_cli.train.recipe import FinetuneRecipe

    # A model built or converted into the cache (tiny:, package:) is written before the process
    # group exists: inside one, transformers' save_pretrained writes nothing on ranks other
    # than 0, and each machine needs its own cache. Ranks racing to write it is safe.
    resolve_source(cfg.model)
    world = init_world(
        cfg.distributed.strategy, cfg.distributed.timeout_s, resolve_device(cfg.train.device)
    )
    # Rank 0 speaks for the job; the others only report their own errors (see `main`).
    console.quiet = not world.main
    try:
        FinetuneRecipe(cfg, overrides, recipes_dir, world).run()
    finally:
        close_world(world)
    return 0


def launch_ranks(cfg, recipe: str, overrides: list[str], recipes_dir: Path | None) -> int:
    """`distributed.nproc=N`: check the recipe here, then run N ranks of this command under
    torchrun's engine and wait for them."""
    from mode_cli.config import validate
    from mode_cli.console import console
    from mode_cli.train.distributed import launch
    from mode_cli.train.recipe import default_output_dir, resume_command

    validate(cfg)
    # One folder for every rank (and every restart): named here, not by each rank's clock.
    out = cfg.output_dir or str(default_output_dir(recipe))
    if cfg.output_dir is None and cfg.resume == "auto":
        raise ModeError("resume=auto needs output_dir=DIR: the run folder to continue")
    if cfg.output_dir is None and cfg.resume is not None:
        # resume=PATH alone continues that run in its own folder, as one process does.
        from mode_cli.train.checkpoint import resume_candidates, run_folder

        out = str(run_folder(resume_candidates(cfg.resume, Path(out)).paths[0]))
    words = [f"recipe={recipe}", *[o for o in overrides if not o.startswith("output_dir=")]]
    words.append(f"output_dir={out}")
    restarts = cfg.distributed.max_restarts
    if restarts and cfg.resume is None:
        words.append("resume=auto")  # a restart reruns the command: it must continue the run
    if recipes_dir is not None:
        words.append(f"--recipes-dir={recipes_dir}")
    console.print(
        f"[bold]mode train[/bold] {recipe}: {cfg.distributed.nproc} processes "
        f"({cfg.distributed.strategy}) -> {out}"
    )
    result = launch(
        cfg.distributed.nproc,
        ["train", *words],
        max_restarts=restarts,
        grace_s=cfg.distributed.timeout_s,
    )
    if result.failure:
        raise ModeError(
            f"{result.failure}. The run's checkpoints in {out} stay loadable; continue with: "
            f"{resume_command(recipe, overrides, Path(out), recipes_dir)}",
            exit_code=result.exit_code,
        )
    return result.exit_code


def cmd_plan(args: argparse.Namespace) -> int:
    """`mode plan`: the recipe's memory plan, from its model's config alone."""
    import json

    from mode_cli.config import validate
    from mode_cli.console import out
    from mode_cli.recipes import compose_recipe
    from mode_cli.train.fit import plan_recipe, render_plan

    values, overrides = parse_options(args.overrides, {"recipe": TEXT}, rest_allowed=True)
    recipe = values.get("recipe")
    if recipe is None:
        raise ModeError("mode plan needs recipe=NAME (`mode recipes` lists them)")
    cfg = compose_recipe(recipe, overrides, args.recipes_dir)
    # A plan for another machine's GPU is what this command is for: no hardware check.
    validate(cfg, check_hardware=False)
    plan, choice = plan_recipe(cfg, args.memory)
    if args.json:
        record = plan.to_dict()
        if choice is not None:
            record["auto"] = {
                "micro_batch_size": choice.micro_batch,
                "grad_accum_steps": choice.grad_accum_steps,
            }
        sys.stdout.write(json.dumps(record, indent=1) + "\n")
    else:
        out.print(render_plan(plan, cfg.recipe, choice))
    return 1 if plan.fits is False else 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """`mode train -m`: validate every combination first, then run them in turn (sweep.py)."""
    from mode_cli.console import console as log
    from mode_cli.console import out
    from mode_cli.train.sweep import plan_sweep, print_plan, run_sweep

    sweep = plan_sweep(args.overrides, args.recipes_dir)
    if not sweep.swept_keys:
        log.print("nothing to sweep (no key has several values): one run")
    if args.dry_run:
        print_plan(sweep, out)
        log.print(
            f"[bold]dry run[/bold]: {len(sweep.runs)} combinations composed and validated; "
            "no training done"
        )
        return 0
    failed = run_sweep(sweep, log, out)
    if failed:
        log.print(f"[bold red]{failed} of {len(sweep.runs)} runs failed[/bold red]")
        return 1
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from mode_cli.eval.command import run_eval

    values, overrides = parse_options(args.overrides, {"checkpoint": TEXT}, rest_allowed=True)
    checkpoint = values.get("checkpoint")
    if checkpoint is None:
        raise ModeError(
            "mode eval needs checkpoint=DIR (a run folder written by mode train, a merged model "
            "folder, or a model folder or hub id)"
        )
    run_eval(checkpoint, overrides)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """`mode generate` and `mode chat`: load the run once, then stream."""
    from mode_cli.api import load
    from mode_cli.console import console
    from mode_cli.decode.chat import chat_loop, format_prompt
    from mode_cli.decode.generate import stream_reply
    from mode_cli.options import decoding_options

    values, rest = parse_options(args.overrides, {"checkpoint": TEXT}, rest_allowed=True)
    checkpoint = values.get("checkpoint")
    if checkpoint is None:
        raise ModeError(
            f"mode {args.command} needs checkpoint=DIR (a run folder written by mode train, "
            "or its merged/ folder)"
        )
    options = decoding_options(rest, with_prompt=args.command == "generate")
    console.print(f"[dim]loading {checkpoint} ...[/dim]")
    model, tokenizer = load(Path(checkpoint), head=options.head)
    console.print(f"[dim]decoding with the {options.head} head[/dim]")
    if args.command == "chat":
        return chat_loop(model, tokenizer, options)
    prompt = format_prompt(options.prompt, model.mode_config, tokenizer)
    stream_reply(model, tokenizer, prompt, options)
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    """`mode cache`: the tokenized-data cache's entries and size; `mode cache clear` empties it."""
    import time

    from rich.table import Table

    from mode_cli.console import out
    from mode_cli.data.cache import clear_entries, data_cache_dir, list_entries

    folder = data_cache_dir()
    if args.action == "clear":
        removed, freed = clear_entries()
        out.print(f"removed {removed} entries ({freed / 2**20:,.1f} MiB) from {folder}")
        return 0
    entries = list_entries()
    table = Table("kind", "source", "rows", "tokens", "MiB", "last used", title=str(folder))
    for entry in entries:
        table.add_row(
            entry.kind,
            entry.source,
            f"{entry.rows:,}" if entry.complete else "",
            f"{entry.tokens:,}" if entry.tokens else "",
            f"{entry.bytes / 2**20:,.1f}",
            time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.last_used)),
        )
    out.print(table)
    total = sum(entry.bytes for entry in entries)
    out.print(f"{len(entries)} entries, {total / 2**20:,.1f} MiB; `mode cache clear` removes them")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from mode_cli.export.command import run_export

    run_export(args.overrides)
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf
    from rich.table import Table

    from mode_cli.config import validate
    from mode_cli.console import out
    from mode_cli.recipes import (
        compose_recipe,
        copy_recipe,
        description,
        recipe_files,
        shipped_recipes_dir,
    )

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
