"""`llmctl train RECIPE`: pretrain a model from a recipe, on one CPU, under torchrun, or launching torchrun."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

app = typer.Typer(add_completion=False)


@app.command(name="train")
def train(
    recipe_path: Path = typer.Argument(..., metavar="RECIPE", help="A TOML recipe, e.g. recipes/tiny.toml."),
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
    rdzv_endpoint: str | None = typer.Option(None, "--rdzv-endpoint", help="HOST:PORT of the rendezvous."),
) -> None:
    """Train a model from a recipe: validation, checkpoints and metrics land in the run directory."""
    from llmctl.recipe import load_recipe

    recipe = load_recipe(recipe_path, overrides)
    if dry_run:
        from llmctl.commands.train_report import print_plan
        from llmctl.train.plan import make_plan

        print_plan(recipe, make_plan(recipe, world_size=nproc * nnodes))
        return
    if nproc > 1 or nnodes > 1:
        from llmctl.train.distributed import launch_torchrun
        from llmctl.train.plan import make_plan
        from llmctl.train.run_dir import check_run_dir

        make_plan(recipe, world_size=nproc * nnodes)  # a recipe the ranks would refuse fails here, once
        check_run_dir(recipe.run_dir, resume, overwrite)
        forwarded = ["train", str(recipe_path), *(arg for o in overrides for arg in ("--set", o))]
        if resume:
            forwarded += ["--resume", resume]
        if overwrite:
            forwarded.append("--overwrite")
        raise typer.Exit(launch_torchrun(nproc, nnodes, node_rank, rdzv_endpoint, forwarded))

    from llmctl.train.distributed import init_distributed, shutdown_distributed

    context = init_distributed(recipe.train.device, recipe.distributed.backend)
    try:
        result = _run(recipe, context, resume, overwrite)
    finally:
        shutdown_distributed()
    if result.interrupted:
        sys.exit(130)


def _run(recipe, context, resume: str | None, overwrite: bool):
    """Own the trainer in this frame only: its DDP reducer must be freed before the process group is
    destroyed (freeing it afterwards joins gloo's worker thread while holding the GIL: a deadlock)."""
    from llmctl.commands.train_report import TrainingConsole
    from llmctl.train.trainer import Trainer

    console = TrainingConsole(enabled=context.is_main)
    trainer = Trainer(recipe, context, on_event=console.on_event)
    result = trainer.fit(resume=resume, overwrite=overwrite)
    console.finish(result)
    return result
