"""`NAME@VERSION` and `NAME@ALIAS`: how a registered model is named wherever a checkpoint path is taken."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from llmctl.errors import UserError

NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]*"
REFERENCE = re.compile(rf"^(?P<name>{NAME})@(?P<ref>[A-Za-z0-9][A-Za-z0-9_.-]*)$")
LATEST = "latest"  # the newest version, without an alias of that name


@dataclass(frozen=True)
class ModelReference:
    name: str
    version: int | None  # NAME@3
    alias: str | None  # NAME@prod, or NAME@latest

    def __str__(self) -> str:
        return f"{self.name}@{self.version if self.version is not None else self.alias}"


def parse_reference(text: str) -> ModelReference | None:
    match = REFERENCE.match(text)
    if match is None:
        return None
    ref = match.group("ref")
    if ref.isdigit():
        return ModelReference(match.group("name"), int(ref), None)
    return ModelReference(match.group("name"), None, ref)


def registered_reference(spec: str | Path) -> ModelReference | None:
    """The reference `spec` is, when it is one and not a path that exists (a path always wins)."""
    text = str(spec)
    if Path(text).exists():
        return None
    return parse_reference(text)


def check_model_name(name: str) -> None:
    if not re.fullmatch(NAME, name):
        raise UserError(
            f"model name {name!r} is not usable; use letters, digits, '.', '_' or '-' (no '@' or '/')"
        )
