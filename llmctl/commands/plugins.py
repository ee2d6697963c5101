"""`llmctl plugins`: where each command comes from and whether it loads."""

from __future__ import annotations

from contextlib import suppress

from rich.console import Console
from rich.table import Table

from llmctl.plugins import discover, load


def show_plugins() -> None:
    usable, skipped = discover()
    for source in usable.values():
        with suppress(Exception):  # a failure is recorded in source.status and shown in the table
            load(source)
    table = Table(title="llmctl commands")
    for column in ("command", "package", "version", "kind", "status"):
        table.add_column(column)
    for source in [*usable.values(), *skipped]:
        style = "green" if source.status == "ok" else "red"
        kind = "built-in" if source.builtin else "plugin"
        table.add_row(source.name, source.package, source.version, kind, f"[{style}]{source.status}[/]")
    Console(soft_wrap=True).print(table)
