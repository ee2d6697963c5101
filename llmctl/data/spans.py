"""Large inputs shared between tasks: an uncompressed JSONL file above a size is cut into spans of about
`span_bytes` that start at line beginnings, each with its first line's number, so every task can read its
span and still name documents and problems by the file's own line numbers, as a whole-file read does.

Every other input (text, HTML, PDF, DOCX, tables, compressed files) stays one span: its reader cannot start
in the middle.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from llmctl.data.compression import compression_of, format_suffix

COUNT_BLOCK = 16 << 20


@dataclass(frozen=True)
class Span:
    """The lines of `path` that begin in [start, end) (end None: to the end); the first is line `first_line`."""

    path: Path
    start: int = 0
    end: int | None = None
    first_line: int = 1

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.end is None


def input_spans(paths: list[Path], span_bytes: int) -> list[Span]:
    """The inputs in order, large uncompressed JSONL files cut into spans; the order of spans is the order of
    the documents in them."""
    spans = []
    for path in paths:
        splittable = format_suffix(path) == ".jsonl" and compression_of(path) is None
        if splittable and path.stat().st_size > span_bytes:
            spans.extend(split_lines(path, span_bytes))
        else:
            spans.append(Span(path))
    return spans


def split_lines(path: Path, span_bytes: int) -> list[Span]:
    """`path` cut at the first line beginning at or after every `span_bytes`; one pass counting newlines."""
    size = path.stat().st_size
    spans, start, line = [], 0, 1
    with path.open("rb") as handle:
        while start + span_bytes < size:
            cut = start + span_bytes
            newlines = _count_newlines(handle, start, cut - 1)
            handle.seek(cut - 1)
            rest = handle.readline()  # from the byte before the cut to the end of its line
            boundary = cut - 1 + len(rest)
            if boundary >= size:
                break
            spans.append(Span(path, start, boundary, line))
            start, line = boundary, line + newlines + 1
    return [*spans, Span(path, start, None, line)]


def _count_newlines(handle: BinaryIO, start: int, end: int) -> int:
    handle.seek(start)
    count, left = 0, end - start
    while left > 0:
        block = handle.read(min(COUNT_BLOCK, left))
        if not block:
            break
        count, left = count + block.count(b"\n"), left - len(block)
    return count
