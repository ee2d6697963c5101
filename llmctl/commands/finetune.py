"""`llmctl finetune RECIPE`: LoRA or full finetuning of a base model on chat/instruction examples or domain
text, through the same trainer as `llmctl train`; `llmctl finetune merge ADAPTER --out CKPT`."""

from __future__ import annotations

from pathlib import Path

import typer

from llmctl.commands.groups import DefaultToRun
from llmctl.commands.recipe_run import add_recipe_command

app = typer.Typer(
    add_completion=False,
    cls=DefaultToRun,
    help="Finetune a base model (LoRA or full) on instructions or domain text; merge adapters.",
)


def print_examples_summary(trainer) -> None:
    summary = trainer.summary
    if summary is None:
        return
    typer.echo(
        f"examples: {summary.examples:,} used ({summary.truncated:,} truncated), {summary.skipped:,} skipped as "
        f"longer than the context; {summary.windows:,} training windows, {summary.val_windows:,} held out"
    )


def _trainer() -> type:
    from llmctl.train.finetune import FinetuneTrainer

    return FinetuneTrainer


def _resolve(recipe):
    from llmctl.train.finetune import finetune_recipe

    return finetune_recipe(recipe)


def _plan(recipe, world_size: int):
    from llmctl.train.finetune import finetune_plan

    return finetune_plan(recipe, world_size)


add_recipe_command(
    app,
    "run",
    "Finetune: checkpoints (PEFT adapter directories for LoRA), metrics and samples land in the run directory.",
    ["finetune", "run"],
    _trainer,
    resolve=_resolve,
    plan=_plan,
    before_fit=print_examples_summary,
)


@app.command()
def merge(
    adapter: Path = typer.Argument(..., help="A LoRA adapter directory written by llmctl finetune."),
    out: Path = typer.Option(..., "--out", "-o", help="The plain checkpoint to write."),
    base: Path | None = typer.Option(
        None, help="The base checkpoint (default: the one the adapter records)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out directory."),
    force: bool = typer.Option(
        False, "--force", help="Merge into a base other than the weights the adapter was trained on."
    ),
) -> None:
    """Fold an adapter into its base's weights: a checkpoint that chat, serve, eval and export open directly."""
    from llmctl.adapters import merge_adapter

    base = merge_adapter(adapter, out, base, overwrite, force)
    typer.echo(f"merged {adapter} into {base} -> {out}")
