"""The one exception type for mistakes a user can fix: the CLI prints its message on one line, exit 2."""

from __future__ import annotations

import importlib
from types import ModuleType


class UserError(Exception):
    """Bad input (a path, a recipe key, a malformed file): the message names the thing and the fix."""


def require_extra(module: str, extra: str, purpose: str) -> ModuleType:
    """Import an optional dependency, or say in one line which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(
            f"{purpose} needs the {extra} extra ({module}): pip install 'llmctl[{extra}]'"
        ) from None
