"""`llmctl quantize`: int8 / int4 weight-only quantization, round-to-nearest or calibrated (GPTQ)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from llmctl.commands.compress_report import HELDOUT_TOKENS, heldout_for, print_artefacts

app = typer.Typer(add_completion=False)


Checkpoint = Annotated[
    Path,
    typer.Argument(
        help="The float checkpoint, run directory (its newest), NAME@VERSION|ALIAS or LoRA adapter (merged first)."
    ),
]
Method = Annotated[str, typer.Option(help="int8 (per output channel) or int4 (group-wise).")]
Out = Annotated[Path, typer.Option("--out", "-o", help="The quantized checkpoint directory to write.")]
GroupSize = Annotated[int, typer.Option(help="int4: input columns per scale (32, 64 or 128).")]
Calibrate = Annotated[
    Path | None,
    typer.Option(
        help="Calibrated rounding (GPTQ) against this text's activations: a corpus dir (its train split), "
        ".jsonl or .txt. Without it, plain round-to-nearest."
    ),
]
CalibrationWindows = Annotated[int, typer.Option(min=1, help="Calibration windows to draw.")]
CalibrationLength = Annotated[int, typer.Option(min=8, help="Tokens per calibration window.")]
Heldout = Annotated[
    Path | None,
    typer.Option(
        help="Held-out text for the perplexity column: corpus dir (its val split), .jsonl or .txt "
        "(default: the --calibrate corpus's val split)."
    ),
]
Head = Annotated[bool, typer.Option("--head/--skip-head", help="Quantize the LM head too.")]
Embeddings = Annotated[
    bool, typer.Option("--embeddings/--skip-embeddings", help="Hold the token embedding int8 per row.")
]
Compile = Annotated[
    bool,
    typer.Option(
        "--compile",
        help="Time decoding with the compiled step that serve/chat --compile use (about a minute more).",
    ),
]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out directory.")]


@app.command(name="quantize")
def quantize(
    checkpoint: Checkpoint,
    method: Method,
    out: Out,
    group_size: GroupSize = 64,
    calibrate: Calibrate = None,
    calibration_windows: CalibrationWindows = 128,
    calibration_length: CalibrationLength = 256,
    heldout: Heldout = None,
    heldout_tokens: int = HELDOUT_TOKENS,
    head: Head = True,
    embeddings: Embeddings = True,
    compile: Compile = False,
    overwrite: Overwrite = False,
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
