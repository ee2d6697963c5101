"""The decode-step option `chat` and `serve` share (kept apart from their torch-importing helpers, so that
`--help` loads no torch)."""

from __future__ import annotations

import typer

COMPILE = typer.Option(
    None,
    "--compile/--no-compile",
    envvar="LLMCTL_COMPILE",
    help="Compile the decode step (torch.compile) for the steps llmctl's fused CPU kernel does not run (quantized "
    "or adapted layers, more than 16 rows). By default on a CPU it compiles in the background while the eager "
    "step answers and takes over when ready (artefacts are cached, so later starts are quicker); "
    "--compile: before the first answer; --no-compile: never (debugging).",
)
