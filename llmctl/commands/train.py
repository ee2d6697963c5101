"""`llmctl train RECIPE`: pretrain a model from a recipe, on one CPU, under torchrun, or launching torchrun."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer()


@app.command(name="train")
def train(
    recipe_path: Path = typer.Argument(..., metavar="RECIPE", help="A TOML recipe, e.g. recipes/tiny.toml."),
    overrides: list[str] = typer.Option([], "--set", help="Override a recipe key: --set optim.lr=3e-4."),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print the resolved recipe and the plan; train nothing."
    ),
    nproc: int = typer.Option(1, "--nproc", min=1, help="Processes per node; >1 launches torchrun."),
) -> None:
    """Train a model from a recipe: validation, checkpoints and metrics land in the run directory."""
    from llmctl.recipe import load_recipe

    recipe = load_recipe(recipe_path, overrides)
    if dry_run:
        from llmctl.commands.train_report import print_plan
        from llmctl.train.plan import make_plan

        print_plan(recipe, make_plan(recipe, world_size=nproc))
        return
    from llmctl.errors import UserError

    raise UserError("`llmctl train` without --dry-run is not implemented yet in this llmctl version")
