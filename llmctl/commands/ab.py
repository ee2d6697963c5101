"""`llmctl ab report LOG`: what an A/B test served through `llmctl serve --ab-log` shows, and its verdict."""

from __future__ import annotations

from pathlib import Path

import typer

from llmctl.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True)


@app.callback()
def ab() -> None:
    """A/B tests of served variants (llmctl serve --route ... --ab-log FILE)."""


@app.command()
def report(
    log: Path = typer.Argument(..., help="The completion log `llmctl serve --ab-log` wrote."),
    control: str | None = typer.Option(
        None, help="The variant the others are tested against (default: most served)."
    ),
    alpha: float = typer.Option(0.05, min=0.0001, max=0.5, help="Significance level of the tests."),
) -> None:
    """Requests, feedback rate and mean score (95% CI), latency percentiles and a test per variant."""
    from rich.console import Console

    from llmctl.evaluate.ab_stats import compare, variant_stats
    from llmctl.infer.ab_log import read_log

    if not log.is_file():
        raise UserError(f"{log} is not a file; pass the path given to llmctl serve --ab-log")
    stats = variant_stats(read_log(log))
    if not stats:
        raise UserError(f"{log} holds no served completions yet")
    if control is not None and control not in stats:
        raise UserError(f"--control {control!r} served nothing in {log} (variants: {', '.join(stats)})")
    control = control or max(stats.values(), key=lambda s: s.requests).name

    table = variant_table(log, stats, control)
    console = Console(highlight=False, soft_wrap=True)
    console.print(table)
    for name, variant in stats.items():
        if name != control:
            console.print(compare(stats[control], variant, alpha).verdict(), markup=False)


def variant_table(log: Path, stats: dict, control: str):
    """One row per variant: requests, users, feedback, mean score and its interval, latency percentiles."""
    from rich.table import Table

    from llmctl.evaluate.ab_stats import percentile

    def number(value: float | None, spec: str) -> str:
        return "-" if value is None else f"{value:{spec}}"

    table = Table(title=f"A/B: {log}")
    for column in (
        "variant",
        "requests",
        "users",
        "rated",
        "mean score",
        "95% CI",
        "p50 s",
        "p95 s",
        "p99 s",
        "TTFT p50 s",
    ):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for name, variant in stats.items():
        interval = variant.interval()
        table.add_row(
            name + (" (control)" if name == control else ""),
            f"{variant.requests:,}",
            f"{variant.users:,}",
            f"{len(variant.scores):,} ({100 * variant.feedback_rate:.0f}%)",
            number(variant.mean, ".3f"),
            "-" if interval is None else f"{interval[0]:.3f}-{interval[1]:.3f}",
            *(number(percentile(variant.latencies, q), ".3f") for q in (50, 95, 99)),
            number(percentile(variant.first_token, 50), ".3f"),
        )
    return table
