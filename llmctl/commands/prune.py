"""`llmctl prune`: magnitude or 2:4 pruning of the block projections, with the sparsity each layer got."""

from __future__ import annotations

from pathlib import Path

import typer

from llmctl.commands.compress_report import HELDOUT, HELDOUT_TOKENS, heldout_for, print_artefacts

app = typer.Typer(add_completion=False)


@app.command(name="prune")
def prune(
    checkpoint: Path = typer.Argument(
        ..., help="A float checkpoint, run directory (its newest), NAME@VERSION|ALIAS or LoRA adapter."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="The pruned checkpoint directory to write."),
    method: str = typer.Option("magnitude", help="magnitude (unstructured, --sparsity) or 2:4."),
    sparsity: float = typer.Option(0.5, help="magnitude: the fraction of each layer's weights to zero."),
    heldout: Path = HELDOUT,
    heldout_tokens: int = HELDOUT_TOKENS,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out directory."),
) -> None:
    """Zero the smallest weights of every block projection, then compare with the source. Recover the lost
    quality with `llmctl finetune` (method full, finetune.keep_sparsity = true) on the pruned checkpoint."""
    from rich.console import Console
    from rich.table import Table

    from llmctl.atomic import check_output
    from llmctl.commands.checkpoint_args import checkpoint_path
    from llmctl.compress.run import prune_checkpoint
    from llmctl.errors import UserError

    if method not in ("magnitude", "2:4"):
        raise UserError(f"unknown pruning method {method!r}; use magnitude or 2:4")
    checkpoint = checkpoint_path(checkpoint)
    check_output(out, [checkpoint], overwrite)
    texts = heldout_for(heldout, None, heldout_tokens)
    reports, sparsities = prune_checkpoint(
        checkpoint, out, method, sparsity, texts, progress=lambda message: typer.echo(message, err=True)
    )
    table = Table(title="measured sparsity per layer")
    table.add_column("layer")
    table.add_column("zeros", justify="right")
    for name, measured in sparsities.items():
        table.add_row(name, f"{measured:.2%}")
    Console(width=160).print(table)
    print_artefacts(reports)
