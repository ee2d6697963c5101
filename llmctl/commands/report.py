"""`llmctl report RUN_DIR... --out DIR`: PNG plots and one self-contained HTML page of one or more runs."""

from __future__ import annotations

from pathlib import Path

import typer

from llmctl.errors import UserError

app = typer.Typer(add_completion=False)


@app.command(name="report")
def report(
    run_dirs: list[Path] = typer.Argument(..., metavar="RUN_DIR...", help="Run directories to report."),
    out: Path = typer.Option(..., help="Folder to write the PNG plots and report.html into."),
    eval_files: list[Path] = typer.Option(
        [], "--eval", help="An `llmctl eval --out` file of a checkpoint of these runs (repeatable)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out folder."),
) -> None:
    """Plot runs (loss, lr, gradient norm, throughput, MFU, memory) and write one HTML page to share."""
    for path in [*run_dirs, *eval_files]:
        if not path.exists():
            raise UserError(f"{path} does not exist")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("llmctl report needs matplotlib: pip install 'llmctl[report]'") from None
    from llmctl.train.run_report import write_report

    page = write_report(run_dirs, out, eval_files, overwrite)
    typer.echo(f"report: {page}")
