"""What every input reader yields: a document, or a problem with a file, page or line that was skipped."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Document:
    id: str
    source: str
    text: str


@dataclass(frozen=True)
class SourceProblem:
    """A file or line that could not be read: reported with its location and skipped (or fatal if strict)."""

    location: str
    reason: str
