"""Checkpoint arguments of chat, serve and eval: a path or a registered NAME@VERSION / NAME@ALIAS, NAME=that,
or the newest checkpoint under runs/."""

from __future__ import annotations

import sys
from pathlib import Path

from llmctl.checkpoint import newest_checkpoint_under
from llmctl.errors import UserError
from llmctl.registry.reference import registered_reference, resolve_model_path


def default_name(path: Path) -> str:
    """runs/legal/checkpoints/step-00001000 -> legal; any other directory -> its own name."""
    return path.parent.parent.name if path.parent.name == "checkpoints" else path.name


def resolve_checkpoint(path: str | None) -> Path:
    if path:
        return resolve_model_path(path)
    found = newest_checkpoint_under(Path("runs"))
    print(f"using the newest checkpoint: {found}", file=sys.stderr)
    return found


def parse_models(arguments: list[str] | None) -> dict[str, Path]:
    if not arguments:
        path = resolve_checkpoint(None)
        return {default_name(path): path}
    named: dict[str, Path] = {}
    for argument in arguments:
        name, sep, spec = argument.partition("=")
        spec = spec if sep else name
        path = resolve_model_path(spec)
        if not sep:  # a registered model is served under its reference, demo@prod
            name = spec if registered_reference(spec) else default_name(path)
        if name in named:
            raise UserError(f"model name {name!r} is used twice; name them: A=PATH B=PATH")
        named[name] = path
    return named
