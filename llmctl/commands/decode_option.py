"""The decode-step option `chat` and `serve` share (kept apart from their torch-importing helpers, so that
`--help` loads no torch)."""

from __future__ import annotations

import typer

COMPILE = typer.Option(
    None,
    "--compile/--no-compile",
    envvar="LLMCTL_COMPILE",
    help="Compile the decode step (torch.compile). By default on a CPU it compiles in the background while the "
    "eager step answers and takes over when ready (artefacts are cached, so later starts are quicker); "
    "--compile: before the first answer; --no-compile: never (debugging).",
)
