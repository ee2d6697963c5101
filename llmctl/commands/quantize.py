"""`llmctl quantize`: int8 / int4 weight-only quantization, round-to-nearest or calibrated (GPTQ)."""

from __future__ import annotations

from pathlib import Path

import typer

from llmctl.commands.compress_report import HELDOUT_TOKENS, heldout_for, print_artefacts

app = typer.Typer(add_completion=False)


@app.command(name="quantize")
def quantize(
    checkpoint: Path = typer.Argument(
        ...,
        help="The float checkpoint, run directory (its newest), NAME@VERSION|ALIAS or LoRA adapter (merged first).",
    ),
    method: str = typer.Option(..., help="int8 (per output channel) or int4 (group-wise)."),
    out: Path = typer.Option(..., "--out", "-o", help="The quantized checkpoint directory to write."),
    group_size: int = typer.Option(64, help="int4: input columns per scale (32, 64 or 128)."),
    calibrate: Path | None = typer.Option(
        None,
        help="Calibrated rounding (GPTQ) against this text's activations: a corpus dir (its train split), "
        ".jsonl or .txt. Without it, plain round-to-nearest.",
    ),
    calibration_windows: int = typer.Option(128, min=1, help="Calibration windows to draw."),
    calibration_length: int = typer.Option(256, min=8, help="Tokens per calibration window."),
    heldout: Path | None = typer.Option(
        None,
        help="Held-out text for the perplexity column: corpus dir (its val split), .jsonl or .txt "
        "(default: the --calibrate corpus's val split).",
    ),
    heldout_tokens: int = HELDOUT_TOKENS,
    head: bool = typer.Option(True, "--head/--skip-head", help="Quantize the LM head too."),
    embeddings: bool = typer.Option(
        True, "--embeddings/--skip-embeddings", help="Hold the token embedding int8 per row."
    ),
    compile: bool = typer.Option(
        False,
        "--compile",
        help="Time decoding with the compiled step that serve/chat --compile use (about a minute more).",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out directory."),
) -> None:
    """Quantize every projection's weights, write a checkpoint chat/serve/eval open directly, and compare
    it with the source: size, held-out perplexity, decode speed."""
    from llmctl.atomic import check_output
    from llmctl.commands.checkpoint_args import checkpoint_path
    from llmctl.compress.run import Calibration, quantize_checkpoint
    from llmctl.errors import UserError
    from llmctl.evaluate.runner import read_texts
    from llmctl.quantization.quantize import QuantizationSettings

    try:
        settings = QuantizationSettings(method, group_size, head=head, embeddings=embeddings)
    except ValueError as error:
        raise UserError(str(error)) from None
    checkpoint = checkpoint_path(checkpoint)
    check_output(out, [checkpoint], overwrite)
    texts = heldout_for(heldout, calibrate, heldout_tokens)
    calibration = None
    if calibrate is not None:
        calibration = Calibration(
            read_texts(calibrate, split="train"), calibration_windows, calibration_length
        )
    reports = quantize_checkpoint(
        checkpoint,
        out,
        settings,
        texts,
        calibration,
        progress=lambda message: typer.echo(message, err=True),
        compile=compile,
    )
    print_artefacts(reports)
