"""Checkpoint arguments of chat, serve and eval: a path, NAME=PATH, or the newest checkpoint under runs/."""

from __future__ import annotations

import sys
from pathlib import Path

from llmctl.checkpoint import newest_checkpoint_under
from llmctl.errors import UserError


def default_name(path: Path) -> str:
    """runs/legal/checkpoints/step-00001000 -> legal; any other directory -> its own name."""
    return path.parent.parent.name if path.parent.name == "checkpoints" else path.name


def resolve_checkpoint(path: str | None) -> Path:
    if path:
        return Path(path)
    found = newest_checkpoint_under(Path("runs"))
    print(f"using the newest checkpoint: {found}", file=sys.stderr)
    return found


def parse_models(arguments: list[str] | None) -> dict[str, Path]:
    if not arguments:
        path = resolve_checkpoint(None)
        return {default_name(path): path}
    named: dict[str, Path] = {}
    for argument in arguments:
        name, sep, path = argument.partition("=")
        path = Path(path if sep else name)
        name = name if sep else default_name(path)
        if name in named:
            raise UserError(f"model name {name!r} is used twice; name them: A=PATH B=PATH")
        named[name] = path
    return named
