"""What `train`, `finetune` and `distill` share: one command shape (a recipe, `--set` overrides, dry run,
resume, overwrite, torchrun options) over one launcher that plans, re-runs itself under torchrun, or trains in
this process with the console reporting."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

RecipePath = Annotated[Path, typer.Argument(metavar="RECIPE", help="A TOML recipe (see recipes/).")]
Overrides = Annotated[list[str], typer.Option("--set", help="Override a recipe key: --set optim.lr=3e-4.")]
DryRun = Annotated[
    bool, typer.Option("--dry-run", help="Print the resolved recipe and the plan; train nothing.")
]
Resume = Annotated[
    str | None, typer.Option(help="'auto' (newest checkpoint of the run) or a checkpoint path.")
]
Overwrite = Annotated[
    bool,
    typer.Option("--overwrite", help="Start over in a run directory that holds an earlier run, deleting it."),
]
Nproc = Annotated[int, typer.Option("--nproc", min=1, help="Processes per node; >1 launches torchrun.")]
Nnodes = Annotated[int, typer.Option("--nnodes", min=1, help="Nodes (with --nproc; passed to torchrun).")]
NodeRank = Annotated[int, typer.Option("--node-rank", min=0, help="This node's rank (multi-node).")]
RdzvEndpoint = Annotated[str | None, typer.Option("--rdzv-endpoint", help="HOST:PORT of the rendezvous.")]
Tui = Annotated[
    bool,
    typer.Option("--tui", help="Watch the run in the Textual monitor; quitting it checkpoints and stops."),
]


@dataclass(frozen=True)
class Launch:
    """Where the run's processes go: torchrun's layout, and whether the monitor watches it."""

    nproc: int = 1
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None
    tui: bool = False

    @property
    def world_size(self) -> int:
        return self.nproc * self.nnodes

    def torchrun_arguments(self) -> list[str]:
        arguments = [
            "--nproc",
            str(self.nproc),
            "--nnodes",
            str(self.nnodes),
            "--node-rank",
            str(self.node_rank),
        ]
        return arguments + (["--rdzv-endpoint", self.rdzv_endpoint] if self.rdzv_endpoint else [])


@dataclass(frozen=True)
class RecipeCommand:
    """One of `train`, `finetune`, `distill`: its words, its trainer (imported lazily), how it completes a loaded
    recipe, how it plans one (default: `train.plan.make_plan`), and the lines it prints on rank 0 before and
    after fitting."""

    words: list[str]
    trainer_class: Callable[[], type]
    resolve: Callable | None = None
    plan: Callable | None = None
    before_fit: Callable | None = None
    after_fit: Callable | None = None


def add_recipe_command(
    app: typer.Typer,
    name: str | None,
    summary: str,
    command_words: list[str],
    trainer_class: Callable[[], type],
    resolve: Callable | None = None,
    plan: Callable | None = None,
    before_fit: Callable | None = None,
    after_fit: Callable | None = None,
) -> None:
    """Register `llmctl <command_words> RECIPE [options]` on `app`. `trainer_class()` imports the trainer
    lazily; `resolve(recipe)` completes a loaded recipe; `plan(recipe, world_size)` is its dry run's plan;
    `before_fit(trainer)` and `after_fit(trainer, result)` print a command's own lines on rank 0."""
    spec = RecipeCommand(command_words, trainer_class, resolve, plan, before_fit, after_fit)

    @app.command(name=name, help=summary)
    def command(
        recipe_path: RecipePath,
        overrides: Overrides = [],  # noqa: B006  (Typer reads the default; it is never mutated)
        dry_run: DryRun = False,
        resume: Resume = None,
        overwrite: Overwrite = False,
        nproc: Nproc = 1,
        nnodes: Nnodes = 1,
        node_rank: NodeRank = 0,
        rdzv_endpoint: RdzvEndpoint = None,
        tui: Tui = False,
    ) -> None:
        launch = Launch(nproc, nnodes, node_rank, rdzv_endpoint, tui)
        run_recipe(spec, recipe_path, overrides, dry_run, resume, overwrite, launch)


def run_recipe(
    spec: RecipeCommand,
    recipe_path: Path,
    overrides: list[str],
    dry_run: bool,
    resume: str | None,
    overwrite: bool,
    launch: Launch,
) -> None:
    """Plan (a dry run), re-run this command under the monitor or torchrun, or train in this process."""
    from llmctl.commands.checkpoint_args import resolve_recipe_references
    from llmctl.recipe import load_recipe
    from llmctl.train.plan import make_plan

    recipe = resolve_recipe_references(load_recipe(recipe_path, overrides))
    if spec.resolve is not None:
        recipe = spec.resolve(recipe)
    if dry_run:
        from llmctl.commands.train_console import print_plan

        print_plan(recipe, (spec.plan or make_plan)(recipe, launch.world_size))
        return
    arguments = [*spec.words, str(recipe_path), *(arg for o in overrides for arg in ("--set", o))]
    forwarded = [
        *arguments,
        *(["--resume", resume] if resume else []),
        *(["--overwrite"] if overwrite else []),
    ]
    if launch.tui or launch.world_size > 1:
        raise typer.Exit(_relaunch(recipe, launch, arguments, forwarded, resume, overwrite))
    from llmctl.train.distributed import init_distributed, shutdown_distributed

    context = init_distributed(recipe.train.device, recipe.distributed.backend)
    try:
        result = _fit(
            spec.trainer_class(), recipe, context, resume, overwrite, spec.before_fit, spec.after_fit
        )
    finally:
        shutdown_distributed()
    if result.interrupted:
        sys.exit(130)


def _relaunch(
    recipe, launch: Launch, arguments: list[str], forwarded: list[str], resume: str | None, overwrite: bool
) -> int:
    """This command again, under the monitor (which restarts it with --resume auto) or torchrun; its exit
    code. A recipe the ranks would refuse, or a run directory they may not use, fails here, once."""
    from llmctl.train.plan import make_plan
    from llmctl.train.run_dir import check_run_dir

    make_plan(recipe, world_size=launch.world_size)
    check_run_dir(recipe.run_dir, resume, overwrite)
    if launch.tui:
        from llmctl.commands.monitor import train_with_monitor

        child = [*forwarded, *launch.torchrun_arguments()]
        return train_with_monitor([recipe.run_dir], child, [*arguments, "--resume", "auto"])
    from llmctl.train.distributed import launch_torchrun

    return launch_torchrun(launch.nproc, launch.nnodes, launch.node_rank, launch.rdzv_endpoint, forwarded)


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
