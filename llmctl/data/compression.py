"""gzip- and zstd-compressed inputs, read as the format their inner suffix names (notes.jsonl.gz is JSONL)."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import BinaryIO

from llmctl.errors import require_extra

COMPRESSIONS = {".gz": "gzip", ".gzip": "gzip", ".zst": "zstd", ".zstd": "zstd"}


def compression_of(path: Path) -> str | None:
    return COMPRESSIONS.get(Path(path).suffix.lower())


def format_suffix(path: Path) -> str:
    """The suffix that says what the (decompressed) file holds: .jsonl for notes.jsonl.gz."""
    path = Path(path)
    if compression_of(path):
        path = path.with_suffix("")
    return path.suffix.lower()


def open_input(path: Path) -> BinaryIO:
    """The file's bytes, decompressed as its suffix says."""
    compression = compression_of(path)
    if compression == "gzip":
        return gzip.open(path, "rb")
    if compression == "zstd":
        zstandard = require_extra("zstandard", "zstd", "reading .zst files")
        return zstandard.open(path, "rb")
    return Path(path).open("rb")
