"""`llmctl train RECIPE`: pretrain a model from a recipe, on one CPU, under torchrun, or launching torchrun."""

from __future__ import annotations

import typer

from llmctl.commands.recipe_run import add_recipe_command


def _trainer() -> type:
    from llmctl.train.trainer import Trainer

    return Trainer


app = typer.Typer(add_completion=False)
add_recipe_command(
    app,
    "train",
    "Train a model from a recipe: validation, checkpoints and metrics land in the run directory.",
    ["train"],
    _trainer,
)
