"""Rich tables and JSON files for `llmctl eval`."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from llmctl.atomic import atomic_write_text
from llmctl.evaluate.results import flatten

console = Console()


def print_results(record: dict) -> None:
    table = Table(
        title=f"evaluation of {record['checkpoint']}"
        + (f" (suite {record['suite']})" if record["suite"] else "")
    )
    for column, justify in (("task", "left"), ("metric", "left"), ("value", "right")):
        table.add_column(column, justify=justify)
    for (task, metric), value in flatten(record["results"]).items():
        table.add_row(task, metric, f"{value:,.4f}")
    console.print(table)


def print_paired_tests(first: dict, second: dict) -> None:
    """For each perplexity task both results ran on the same documents: is the second's bits per byte
    really different from the first's, or within the noise of the document sample?"""
    from llmctl.evaluate.perplexity import paired_bootstrap

    for task in sorted(set(first["results"]) & set(second["results"])):
        tested = paired_bootstrap(first["results"][task], second["results"][task])
        if tested is None:
            continue
        low, high = tested.ci95
        verdict = (
            ("the second is better" if tested.difference < 0 else "the second is worse")
            if tested.significant
            else "no significant difference"
        )
        console.print(
            f"{task}: bits per byte, second - first = {tested.difference:+.4f} (95% CI {low:+.4f} to "
            f"{high:+.4f}, p = {tested.p_value:.3g}, paired bootstrap over {tested.documents} documents): "
            f"{verdict}",
            markup=False,
        )


def write_results(path: Path, record: dict) -> None:
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")
    console.print(f"results written to {path}", markup=False)


def print_comparison(first_path: Path, first: dict, second_path: Path, second: dict) -> None:
    a, b = flatten(first["results"]), flatten(second["results"])
    table = Table(title="evaluation comparison")
    for column, justify in (
        ("task", "left"),
        ("metric", "left"),
        (str(first_path), "right"),
        (str(second_path), "right"),
        ("difference", "right"),
    ):
        table.add_column(column, justify=justify)
    for key in sorted(set(a) | set(b)):
        left, right = a.get(key), b.get(key)
        difference = f"{right - left:+,.4f}" if left is not None and right is not None else "-"
        table.add_row(
            *key,
            "-" if left is None else f"{left:,.4f}",
            "-" if right is None else f"{right:,.4f}",
            difference,
        )
    console.print(table)
