"""What quantize, prune and export share at the command line: the held-out text they measure on, and
the table they end with."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.table import Table

from llmctl.errors import UserError

if TYPE_CHECKING:  # the engine imports torch; `llmctl --help` must not
    from llmctl.compress.measure import ArtefactReport

HELDOUT = typer.Option(
    None,
    help="Held-out text for the perplexity columns: corpus dir (its val split), .jsonl or .txt (without it, "
    "the table compares size and speed only).",
)
HELDOUT_TOKENS = typer.Option(16384, min=1, help="About how many held-out tokens to score.")


def heldout_for(heldout: Path | None, calibrate: Path | None, tokens: int) -> list[str]:
    """The held-out documents to score: --heldout, else the calibration corpus's val split, else none."""
    from llmctl.compress.measure import heldout_texts
    from llmctl.evaluate.runner import read_texts

    source = heldout or calibrate
    if source is None:
        return []
    texts = heldout_texts(read_texts(source), tokens)
    if not any(text.strip() for text in texts):
        raise UserError(f"the held-out text {source} is empty; pass another with --heldout")
    return texts


def print_artefacts(reports: list[ArtefactReport]) -> None:
    """One table: size, held-out perplexity and its change, batch-1 decode speed, against the first row."""
    source = reports[0]
    table = Table(title="artefacts (first row: the source)")
    for column in (
        "artefact",
        "path",
        "size",
        "vs source",
        "perplexity",
        "change",
        "decode tok/s",
        "speed-up",
    ):
        table.add_column(column, justify="left" if column in ("artefact", "path") else "right")
    for report in reports:
        change = report.change_against(source)
        speed = report.decode_tokens_per_second
        table.add_row(
            report.label,
            str(report.path),
            f"{report.size_bytes / 2**20:,.1f} MiB",
            f"{source.size_bytes / report.size_bytes:.2f}x smaller" if report is not source else "",
            f"{report.perplexity:.3f}" if report.perplexity is not None else report.note or "-",
            f"{change:+.2%}" if change is not None and report is not source else "",
            f"{speed:,.1f}" if speed is not None else "-",
            f"{speed / source.decode_tokens_per_second:.2f}x"
            if speed and source.decode_tokens_per_second and report is not source
            else "",
        )
    Console(width=160).print(table)
