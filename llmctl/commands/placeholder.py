"""Commands announced by the design card but not built yet answer honestly instead of pretending."""

from __future__ import annotations

import typer

from llmctl.errors import UserError


def placeholder_app(name: str, summary: str) -> typer.Typer:
    """A one-command app that accepts any arguments and exits 2 saying the command is not built yet."""
    app = typer.Typer(add_completion=False)

    @app.command(
        name=name,
        help=f"{summary} (not implemented yet)",
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    )
    def command(ctx: typer.Context) -> None:
        raise UserError(f"`llmctl {name}` is not implemented yet in this llmctl version; see CHANGELOG.md")

    return app
