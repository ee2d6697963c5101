"""Reading documents from files, folders and globs of .txt, .md, .jsonl and .html, one at a time."""

from __future__ import annotations

import glob
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bs4 import BeautifulSoup

from llmctl.data.jsonl import jsonl_lines
from llmctl.errors import UserError

SUFFIXES = {".txt", ".md", ".jsonl", ".html", ".htm"}
BINARY_SNIFF_BYTES = 8192


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


def expand_sources(sources: list[str]) -> list[Path]:
    """Files, folders (recursive) and globs -> the sorted list of readable document files."""
    files: set[Path] = set()
    for source in sources:
        path = Path(source)
        if path.is_dir():
            files.update(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
        elif path.is_file():
            files.add(path)
        else:
            matches = [Path(p) for p in glob.glob(source, recursive=True)]
            if not matches:
                raise UserError(f"source not found: {source} (give files, folders or quoted globs)")
            files.update(p for p in matches if p.is_file() and p.suffix.lower() in SUFFIXES)
    if not files:
        raise UserError(f"no .txt, .md, .jsonl or .html files in {' '.join(sources)}")
    return sorted(files)


def read_documents(paths: list[Path], text_field: str = "text") -> Iterator[Document | SourceProblem]:
    """Stream documents; whole-file formats hold one document, JSONL one per line."""
    for path in paths:
        suffix = path.suffix.lower()
        try:
            with path.open("rb") as handle:
                head = handle.read(BINARY_SNIFF_BYTES)
        except OSError as error:
            yield SourceProblem(str(path), f"unreadable: {error.strerror or error}")
            continue
        if b"\x00" in head:
            yield SourceProblem(str(path), "binary file (contains NUL bytes)")
            continue
        if suffix == ".jsonl":
            yield from _read_jsonl(path, text_field)
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            yield SourceProblem(str(path), f"invalid UTF-8 at byte {error.start}")
            continue
        if suffix in (".html", ".htm"):
            text = html_to_text(text)
        yield Document(id=str(path), source=str(path), text=text)


def _read_jsonl(path: Path, text_field: str) -> Iterator[Document | SourceProblem]:
    for where, record, problem in jsonl_lines(path):
        if problem is not None:
            yield SourceProblem(where, problem)
            continue
        text = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            yield SourceProblem(where, f"no string field {text_field!r} (set --text-field)")
            continue
        yield Document(id=str(record.get("id", where)), source=str(record.get("source", path)), text=text)


def html_to_text(html: str) -> str:
    """Visible text of an HTML page, one block per paragraph; scripts, styles and navigation dropped."""
    soup = BeautifulSoup(html, "html.parser")
    for tag in soup(["script", "style", "noscript", "nav", "header", "footer", "template"]):
        tag.decompose()
    return soup.get_text(separator="\n")
