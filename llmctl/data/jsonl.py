"""JSON Lines input: every .jsonl reader goes through here, so a bad line is reported the same way everywhere
(the file and line, and what is wrong with it)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmctl.data.compression import DOCUMENT_BYTES, TooLarge, bounded_lines, open_input
from llmctl.errors import UserError


def jsonl_lines(
    path: Path, start: int = 0, end: int | None = None, first_line: int = 1, limit: int = DOCUMENT_BYTES
) -> Iterator[tuple[str, Any, str | None]]:
    """(location "file:line", record, problem) per non-blank line; record is None where problem says why.
    `start`, `end`, `first_line`: only the lines of an uncompressed file that begin in [start, end), where
    the line at `start` is line `first_line` (one share of a large file, data/spans.py). A line longer than
    `limit` bytes is a problem, read past without being held."""
    with open_input(path) as handle:  # notes.jsonl.gz and .zst too
        if start:
            handle.seek(start)
        position = start
        for number, (raw, size) in enumerate(bounded_lines(handle, limit), start=first_line):
            if end is not None and position >= end:
                break
            position += size
            location = f"{path}:{number}"
            if raw is None:
                yield location, None, str(TooLarge(limit))
                continue
            if not raw.strip():
                continue
            try:
                yield location, json.loads(raw.decode("utf-8")), None
            except UnicodeDecodeError as error:
                yield location, None, f"invalid UTF-8 at byte {error.start}"
            except json.JSONDecodeError as error:
                yield location, None, f"malformed JSON ({error.msg} at column {error.colno})"


def read_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    """(location, record) per line; the first bad line is a UserError naming it."""
    for location, record, problem in jsonl_lines(path):
        if problem is not None:
            raise UserError(f"{location}: {problem}")
        yield location, record


def string_field(location: str, record: Any, name: str) -> str:
    """record[name] when the record is an object with a string there; else a UserError naming the line."""
    value = record.get(name) if isinstance(record, dict) else None
    if not isinstance(value, str):
        raise UserError(f"{location}: expected a JSON object with a string field {name!r}")
    return value
