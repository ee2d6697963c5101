"""gzip- and zstd-compressed inputs, read as the format their inner suffix names (notes.jsonl.gz is JSONL),
and the per-document byte limit every reader applies as it decompresses or extracts: a small file that
expands to gigabytes (a decompression bomb, or one enormous line) is skipped once it passes the limit, so
memory stays bounded by the limit, never by the input."""

from __future__ import annotations

import gzip
import io
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from llmctl.errors import require_extra

COMPRESSIONS = {".gz": "gzip", ".gzip": "gzip", ".zst": "zstd", ".zstd": "zstd"}
DOCUMENT_BYTES = 64 << 20  # the default limit: 16x the longest document the default filters keep
SKIP_CHUNK = 1 << 20


class TooLarge(Exception):
    """An input (or one line of it) that grew past the per-document byte limit as it was read."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"larger than the {limit:,}-byte document limit once decompressed (raise it with "
            "--max-document-bytes)"
        )


def compression_of(path: Path) -> str | None:
    return COMPRESSIONS.get(Path(path).suffix.lower())


def format_suffix(path: Path) -> str:
    """The suffix that says what the (decompressed) file holds: .jsonl for notes.jsonl.gz."""
    path = Path(path)
    if compression_of(path):
        path = path.with_suffix("")
    return path.suffix.lower()


def open_input(path: Path) -> BinaryIO:
    """The file's bytes, decompressed as its suffix says (buffered: lines can be read from every kind)."""
    compression = compression_of(path)
    if compression == "gzip":
        return gzip.open(path, "rb")
    if compression == "zstd":
        zstandard = require_extra("zstandard", "zstd", "reading .zst files")
        return io.BufferedReader(
            zstandard.ZstdDecompressor().stream_reader(Path(path).open("rb"), closefd=True)
        )
    return Path(path).open("rb")


def read_bounded(handle: BinaryIO, limit: int) -> bytes:
    """All of a stream, refused with TooLarge once it passes `limit` bytes (never holding more than that)."""
    data = handle.read(limit + 1)
    if len(data) > limit:
        raise TooLarge(limit)
    return data


def bounded_lines(handle: BinaryIO, limit: int) -> Iterator[tuple[bytes | None, int]]:
    """(line, bytes it spans) for each line; None in place of a line longer than `limit`, whose rest is read
    past in chunks rather than held."""
    while line := handle.readline(limit + 1):
        if len(line) <= limit or line.endswith(b"\n"):
            yield line, len(line)
            continue
        size = len(line)
        while (rest := handle.readline(SKIP_CHUNK)) and not rest.endswith(b"\n"):
            size += len(rest)
        yield None, size + len(rest)
