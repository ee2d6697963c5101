"""What `train`, `finetune` and `distill` share: one command shape (a recipe, `--set` overrides, dry run,
resume, overwrite, torchrun options) over one launcher that plans, re-runs itself under torchrun, or trains in
this process with the console reporting."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import typer


def add_recipe_command(
    app: typer.Typer,
    name: str | None,
    summary: str,
    command_words: list[str],
    trainer_class: Callable[[], type],
    resolve: Callable | None = None,
    before_fit: Callable | None = None,
    after_fit: Callable | None = None,
) -> None:
    """Register `llmctl <command_words> RECIPE [options]` on `app`. `trainer_class()` imports the trainer
    lazily; `resolve(recipe)` completes a loaded recipe; `before_fit(trainer)` and `after_fit(trainer,
    result)` print a command's own lines on rank 0."""

    @app.command(name=name, help=summary)
    def command(
        recipe_path: Path = typer.Argument(..., metavar="RECIPE", help="A TOML recipe (see recipes/)."),
        overrides: list[str] = typer.Option([], "--set", help="Override a recipe key: --set optim.lr=3e-4."),
        dry_run: bool = typer.Option(
            False, "--dry-run", help="Print the resolved recipe and the plan; train nothing."
        ),
        resume: str | None = typer.Option(
            None, help="'auto' (newest checkpoint of the run) or a checkpoint path."
        ),
        overwrite: bool = typer.Option(
            False, "--overwrite", help="Start over in a run directory that holds an earlier run, deleting it."
        ),
        nproc: int = typer.Option(1, "--nproc", min=1, help="Processes per node; >1 launches torchrun."),
        nnodes: int = typer.Option(1, "--nnodes", min=1, help="Nodes (with --nproc; passed to torchrun)."),
        node_rank: int = typer.Option(0, "--node-rank", min=0, help="This node's rank (multi-node)."),
        rdzv_endpoint: str | None = typer.Option(
            None, "--rdzv-endpoint", help="HOST:PORT of the rendezvous."
        ),
        tui: bool = typer.Option(
            False, "--tui", help="Watch the run in the Textual monitor; quitting it checkpoints and stops."
        ),
    ) -> None:
        from llmctl.commands.checkpoint_args import resolve_recipe_references
        from llmctl.recipe import load_recipe

        recipe = resolve_recipe_references(load_recipe(recipe_path, overrides))
        if resolve is not None:
            recipe = resolve(recipe)
        world_size = nproc * nnodes
        arguments = [*command_words, str(recipe_path), *(arg for o in overrides for arg in ("--set", o))]
        if dry_run:
            from llmctl.commands.train_console import print_plan
            from llmctl.train.plan import make_plan

            print_plan(recipe, make_plan(recipe, world_size=world_size))
            return
        if tui or world_size > 1:
            from llmctl.train.plan import make_plan
            from llmctl.train.run_dir import check_run_dir

            make_plan(recipe, world_size=world_size)  # a recipe the ranks would refuse fails here, once
            check_run_dir(recipe.run_dir, resume, overwrite)
        forwarded = [
            *arguments,
            *(["--resume", resume] if resume else []),
            *(["--overwrite"] if overwrite else []),
        ]
        if tui:
            from llmctl.commands.monitor import train_with_monitor

            launch = ["--nproc", str(nproc), "--nnodes", str(nnodes), "--node-rank", str(node_rank)]
            launch += ["--rdzv-endpoint", rdzv_endpoint] if rdzv_endpoint else []
            code = train_with_monitor(recipe.run_dir, [*forwarded, *launch], [*arguments, "--resume", "auto"])
            raise typer.Exit(code)
        if world_size > 1:
            from llmctl.train.distributed import launch_torchrun

            raise typer.Exit(launch_torchrun(nproc, nnodes, node_rank, rdzv_endpoint, forwarded))

        from llmctl.train.distributed import init_distributed, shutdown_distributed

        context = init_distributed(recipe.train.device, recipe.distributed.backend)
        try:
            result = _fit(trainer_class(), recipe, context, resume, overwrite, before_fit, after_fit)
        finally:
            shutdown_distributed()
        if result.interrupted:
            sys.exit(130)


def _fit(trainer_class: type, recipe, context, resume, overwrite, before_fit, after_fit):
    """Own the trainer in this frame only: its DDP reducer must be freed before the process group is
    destroyed (freeing it afterwards joins gloo's worker thread while holding the GIL: a deadlock)."""
    from llmctl.commands.train_console import TrainingConsole

    console = TrainingConsole(enabled=context.is_main)
    trainer = trainer_class(recipe, context, on_event=console.on_event)
    if before_fit is not None and context.is_main:
        before_fit(trainer)
    result = trainer.fit(resume=resume, overwrite=overwrite)
    console.finish(result)
    if after_fit is not None and context.is_main:
        after_fit(trainer, result)
    return result
