"""Reading documents from files, folders and globs of .txt, .md, .rst, .jsonl and .html, one at a time.

A file named on the command line is read as text whatever its suffix; in a folder or glob, a file of
another format is reported as unsupported (and counted), never silently left out. Hidden files and folders
(.git, .venv) are not inputs.
"""

from __future__ import annotations

import glob
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bs4 import BeautifulSoup

from llmctl.data.jsonl import jsonl_lines
from llmctl.errors import UserError

SUFFIXES = {".txt", ".text", ".md", ".markdown", ".rst", ".jsonl", ".html", ".htm"}
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


def expand_sources(sources: list[str]) -> tuple[list[Path], list[SourceProblem]]:
    """Files, folders (recursive) and globs -> the sorted document files to read, and the files found in
    folders and globs whose format is not supported."""
    files: set[Path] = set()
    found: set[Path] = set()
    for source in sources:
        path = Path(source)
        if path.is_dir():
            found.update(p for p in path.rglob("*") if p.is_file() and not _hidden(p.relative_to(path)))
        elif path.is_file():
            files.add(path)
        else:
            matches = [Path(p) for p in glob.glob(source, recursive=True)]
            if not matches:
                raise UserError(f"source not found: {source} (give files, folders or quoted globs)")
            found.update(p for p in matches if p.is_file())
    files.update(p for p in found if p.suffix.lower() in SUFFIXES)
    unsupported = [
        SourceProblem(str(p), f"unsupported format {p.suffix or '(no suffix)'}; name the file to read it as text")
        for p in sorted(found - files)
    ]
    if not files:
        raise UserError(f"no .txt, .md, .rst, .jsonl or .html files in {' '.join(sources)}")
    return sorted(files), unsupported


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


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
