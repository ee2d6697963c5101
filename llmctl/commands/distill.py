"""`llmctl distill RECIPE`: train a student recipe against a frozen teacher, through the same trainer as
`llmctl train` (resume, metrics, torchrun)."""

from __future__ import annotations

import math

import typer

from llmctl.commands.recipe_run import add_recipe_command


def _trainer() -> type:
    from llmctl.train.distill import DistillTrainer

    return DistillTrainer


def print_comparison(trainer, result) -> None:
    if result.val_loss is None:
        return
    teacher = trainer.teacher_val_loss
    typer.echo(
        f"held-out perplexity: student {math.exp(result.val_loss):.2f}, teacher {math.exp(teacher):.2f} "
        f"({trainer.model.config.num_parameters():,} vs {trainer.teacher_parameters:,} parameters)"
    )


app = typer.Typer(add_completion=False)
add_recipe_command(
    app,
    "distill",
    "Distill a teacher into a smaller student: alpha x T^2 x KL(teacher || student) + (1 - alpha) x CE.",
    ["distill"],
    _trainer,
    after_fit=print_comparison,
)
