"""Command groups whose first argument is usually the thing to act on, with a few named subcommands beside."""

from __future__ import annotations

import typer.core


class DefaultToRun(typer.core.TyperGroup):
    """`llmctl eval CKPT ...` means `llmctl eval run CKPT ...`; `llmctl eval compare ...` is a subcommand."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in ("--help", "-h")):
            args = ["run", *args]
        return super().parse_args(ctx, args)
