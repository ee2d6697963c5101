"""Parsing checkpoint arguments shared by chat, serve and eval."""

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


def parse_routes(arguments: list[str], models: set[str]) -> dict[str, list[tuple[str, float]]]:
    """'stable=A:0.9,B:0.1' -> {'stable': [('A', 0.9), ('B', 0.1)]}."""
    routes: dict[str, list[tuple[str, float]]] = {}
    for argument in arguments:
        alias, sep, spec = argument.partition("=")
        if not sep or not spec:
            raise UserError(f"--route {argument!r}: expected ALIAS=MODEL:WEIGHT,MODEL:WEIGHT")
        targets = []
        for part in spec.split(","):
            name, _, weight = part.partition(":")
            if name not in models:
                raise UserError(
                    f"--route {argument!r}: {name!r} is not a served model ({', '.join(sorted(models))})"
                )
            try:
                targets.append((name, float(weight or 1)))
            except ValueError:
                raise UserError(f"--route {argument!r}: weight {weight!r} is not a number") from None
        if alias in models:
            raise UserError(f"--route alias {alias!r} is also a model name; pick another alias")
        routes[alias] = targets
    return routes
