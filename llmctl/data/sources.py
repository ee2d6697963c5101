"""Reading documents from files, folders and globs, one at a time: text (.txt, .md, .rst), .jsonl, .html,
PDF, DOCX, Parquet and CSV, each optionally gzip- or zstd-compressed (notes.jsonl.gz).

A file named on the command line with an unknown suffix is read as text; in a folder or glob, a file of
another format is reported as unsupported (and counted), never silently left out. Hidden files and folders
(.git, .venv) are not inputs.
"""

from __future__ import annotations

import glob
import zlib
from collections.abc import Iterator
from pathlib import Path

from bs4 import BeautifulSoup

from llmctl.data.compression import DOCUMENT_BYTES, TooLarge, format_suffix, open_input, read_bounded
from llmctl.data.documents import Document, SourceProblem
from llmctl.data.formats import read_csv, read_docx, read_parquet, read_pdf
from llmctl.data.jsonl import jsonl_lines
from llmctl.data.spans import Span
from llmctl.errors import UserError

TEXT_SUFFIXES = {".txt", ".text", ".md", ".markdown", ".rst"}
HTML_SUFFIXES = {".html", ".htm"}
SUFFIXES = {*TEXT_SUFFIXES, *HTML_SUFFIXES, ".jsonl", ".pdf", ".docx", ".parquet", ".csv"}
BINARY_SNIFF_BYTES = 8192
HTML_MODES = ("main", "all")


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
    files.update(p for p in found if format_suffix(p) in SUFFIXES)
    unsupported = [
        SourceProblem(
            str(p), f"unsupported format {p.suffix or '(no suffix)'}; name the file to read it as text"
        )
        for p in sorted(found - files)
    ]
    if not files:
        raise UserError(
            f"no .txt, .md, .rst, .jsonl, .html, .pdf, .docx, .parquet or .csv files in {' '.join(sources)}"
        )
    return sorted(files), unsupported


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def read_documents(
    paths: list[Path], text_field: str = "text", html: str = "main", limit: int = DOCUMENT_BYTES
) -> Iterator[Document | SourceProblem]:
    """Stream documents: a text, HTML, PDF or DOCX file is one, a JSONL line or a table row one each.
    `html`: "main" keeps a page's main content (trafilatura), "all" every visible text block. A document
    that grows past `limit` bytes as it is decompressed or extracted is skipped, as a problem."""
    if html not in HTML_MODES:
        raise UserError(f"unknown HTML mode {html!r}; use main (the main content) or all (all visible text)")
    for path in paths:
        try:
            yield from _read_file(path, format_suffix(path), text_field, html, limit)
        except TooLarge as error:
            yield SourceProblem(str(path), str(error))
        except (OSError, EOFError, zlib.error) as error:  # unreadable, or a corrupt compressed stream
            yield SourceProblem(str(path), f"unreadable: {getattr(error, 'strerror', None) or error}")


def read_span(
    span: Span, text_field: str = "text", html: str = "main", limit: int = DOCUMENT_BYTES
) -> Iterator[Document | SourceProblem]:
    """The documents of one span of the inputs (data/spans.py): a whole file, or the lines of a JSONL file's
    share, named by the file's own line numbers."""
    if span.whole:
        yield from read_documents([span.path], text_field, html, limit)
        return
    try:
        yield from _read_jsonl(span.path, text_field, limit, span)
    except OSError as error:
        yield SourceProblem(str(span.path), f"unreadable: {error.strerror or error}")


def _read_file(
    path: Path, suffix: str, text_field: str, html: str, limit: int
) -> Iterator[Document | SourceProblem]:
    if suffix == ".pdf":
        yield from read_pdf(path, limit)
    elif suffix == ".docx":
        yield from read_docx(path, limit)
    elif suffix == ".parquet":
        yield from read_parquet(path, text_field, limit)
    elif suffix == ".csv":
        yield from read_csv(path, text_field, limit)
    elif suffix == ".jsonl":
        yield from _read_jsonl(path, text_field, limit)
    else:
        yield from _read_text(path, html if suffix in HTML_SUFFIXES else None, limit)


def _read_text(path: Path, html: str | None, limit: int) -> Iterator[Document | SourceProblem]:
    with open_input(path) as handle:
        data = read_bounded(handle, limit)
    if b"\x00" in data[:BINARY_SNIFF_BYTES]:
        yield SourceProblem(str(path), "binary file (contains NUL bytes)")
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        yield SourceProblem(str(path), f"invalid UTF-8 at byte {error.start}")
        return
    if html == "main":
        text = html_main_text(text)
    elif html == "all":
        text = html_to_text(text)
    yield Document(id=str(path), source=str(path), text=text)


def _read_jsonl(
    path: Path, text_field: str, limit: int, span: Span | None = None
) -> Iterator[Document | SourceProblem]:
    if span is None:
        lines = jsonl_lines(path, limit=limit)
    else:
        lines = jsonl_lines(path, span.start, span.end, span.first_line, limit)
    for where, record, problem in lines:
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


def html_main_text(html: str) -> str:
    """A page's main content (article text, tables kept), without navigation, footers and boilerplate."""
    try:
        import trafilatura
    except ImportError:
        raise UserError(
            "reading the main content of HTML pages needs the html extra (trafilatura): pip install "
            "'llmctl[html]', or pass --html all for all visible text"
        ) from None
    return trafilatura.extract(html, include_tables=True, include_comments=False, favor_recall=True) or ""
