"""`llmctl export`: a checkpoint as one GGUF file that llama.cpp runs."""

from __future__ import annotations

from pathlib import Path

import typer

from llmctl.commands.compress_report import HELDOUT, HELDOUT_TOKENS, heldout_for, print_artefacts

app = typer.Typer(add_completion=False)


@app.command(name="export")
def export(
    checkpoint: Path = typer.Argument(
        ...,
        help="A checkpoint, run directory (its newest), NAME@VERSION|ALIAS, LoRA adapter (merged) or quantized checkpoint.",
    ),
    out: Path = typer.Option(..., "--out", "-o", help="The .gguf file to write."),
    format: str = typer.Option("gguf", "--format", help="gguf (llama.cpp)."),
    type: str = typer.Option("f16", "--type", help="Tensor type: f32, f16, q8_0 or q4_0."),
    heldout: Path = HELDOUT,
    heldout_tokens: int = HELDOUT_TOKENS,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out file."),
) -> None:
    """Write the model and its tokenizer as one file for another runtime, and compare it with the source."""
    from llmctl.atomic import check_output
    from llmctl.checkpoint import model_directory
    from llmctl.compress.gguf_export import FILE_TYPES
    from llmctl.compress.run import export_gguf
    from llmctl.errors import UserError

    if format != "gguf":
        raise UserError(f"unknown export format {format!r}; llmctl exports gguf")
    if type not in FILE_TYPES:
        raise UserError(f"unknown GGUF type {type!r}; use one of {', '.join(FILE_TYPES)}")
    checkpoint = model_directory(checkpoint)
    check_output(out, [checkpoint], overwrite)
    texts = heldout_for(heldout, None, heldout_tokens)
    reports = export_gguf(
        checkpoint, out, type, texts, progress=lambda message: typer.echo(message, err=True)
    )
    print_artefacts(reports)
    for report in reports:
        if report.note:
            typer.echo(f"{report.label}: {report.note}")
