"""`llmctl export`: a checkpoint as one GGUF file that llama.cpp runs, or an ONNX directory for onnxruntime."""

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
    out: Path = typer.Option(..., "--out", "-o", help="The .gguf file, or the ONNX directory, to write."),
    format: str = typer.Option("gguf", "--format", help="gguf (llama.cpp) or onnx (onnxruntime)."),
    type: str | None = typer.Option(
        None, "--type", help="GGUF tensor type: f32, f16 (default), q8_0 or q4_0. ONNX is written f32."
    ),
    heldout: Path = HELDOUT,
    heldout_tokens: int = HELDOUT_TOKENS,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out file."),
) -> None:
    """Write the model and its tokenizer as one file for another runtime, and compare it with the source."""
    from llmctl.atomic import check_output
    from llmctl.commands.checkpoint_args import checkpoint_path
    from llmctl.compress.gguf_export import FILE_TYPES
    from llmctl.compress.run import export_gguf, export_onnx
    from llmctl.errors import UserError

    if format not in ("gguf", "onnx"):
        raise UserError(f"unknown export format {format!r}; use gguf or onnx")
    if format == "gguf" and (type or "f16") not in FILE_TYPES:
        raise UserError(f"unknown GGUF type {type!r}; use one of {', '.join(FILE_TYPES)}")
    if format == "onnx":
        from llmctl.compress.onnx_export import require_onnx, require_onnxruntime

        if type not in (None, "f32"):
            raise UserError(f"--type {type} is a GGUF type; an ONNX export is written f32, so leave it out")
        require_onnx()
        require_onnxruntime()
    checkpoint = checkpoint_path(checkpoint)
    check_output(out, [checkpoint], overwrite)
    texts = heldout_for(heldout, None, heldout_tokens)

    def progress(message: str) -> None:
        typer.echo(message, err=True)

    if format == "onnx":
        reports = export_onnx(checkpoint, out, texts, progress)
    else:
        reports = export_gguf(checkpoint, out, type or "f16", texts, progress)
    print_artefacts(reports)
    for report in reports:
        if report.note:
            typer.echo(f"{report.label}: {report.note}")
