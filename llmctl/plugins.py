"""Discovery of CLI commands through the `llmctl.commands` entry-point group.

Built-ins register there exactly as third-party plugins do. A plugin may add commands but never replace
a built-in, and a plugin that fails to load is reported and skipped, never fatal.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points

GROUP = "llmctl.commands"
BUILTIN_PACKAGE = "llmctl"


@dataclass
class CommandSource:
    name: str
    entry_point: EntryPoint
    package: str
    version: str
    status: str = "not loaded"

    @property
    def builtin(self) -> bool:
        return self.package == BUILTIN_PACKAGE


def discover() -> tuple[dict[str, CommandSource], list[CommandSource]]:
    """(usable commands by name, skipped ones). Built-ins come first and win every name clash."""
    seen: set[tuple[str, str]] = set()
    sources = []
    for entry_point in entry_points(group=GROUP):
        # The same distribution can be visible twice (an editable install plus its source tree).
        if (entry_point.name, entry_point.value) in seen:
            continue
        seen.add((entry_point.name, entry_point.value))
        dist = entry_point.dist
        sources.append(
            CommandSource(
                name=entry_point.name,
                entry_point=entry_point,
                package=dist.name if dist else "unknown",
                version=dist.version if dist else "?",
            )
        )
    sources.sort(key=lambda source: not source.builtin)
    usable: dict[str, CommandSource] = {}
    skipped: list[CommandSource] = []
    for source in sources:
        if source.name in usable:
            owner = usable[source.name]
            source.status = f"skipped: `{source.name}` is already provided by {owner.package}"
            skipped.append(source)
        else:
            usable[source.name] = source
    return usable, skipped


def load(source: CommandSource) -> Callable | object:
    """Import the object an entry point names; on failure, record why and re-raise."""
    try:
        loaded = source.entry_point.load()
    except Exception as error:
        source.status = f"error: {type(error).__name__}: {error}"
        raise
    source.status = "ok"
    return loaded
