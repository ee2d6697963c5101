"""Append-only JSONL files that several readers follow while one process writes (metrics.jsonl, the A/B
completion log): opened so that a line a crash left half-written spoils only itself, and read a line at a
time, a line that is no JSON object (that half-written one) skipped."""

from __future__ import annotations

import json
import os
from pathlib import Path


def open_append_log(path: Path) -> int:
    """An O_APPEND descriptor on `path` (created if missing), its last line closed first if it was left open."""
    descriptor = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    size = os.fstat(descriptor).st_size
    if size and os.pread(descriptor, 1, size - 1) != b"\n":
        os.write(descriptor, b"\n")
    return descriptor


def parse_record(line: bytes | str) -> dict | None:
    """One line's record, or None for a line that is no JSON object."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None
