"""Readers for the formats a company's text sits in besides plain text: PDF (the text layer), DOCX, and
tables (Parquet, CSV) with one document per row of a text column. Each library is an optional extra,
named in one line when missing; a page, row or file that yields no text is reported, never dropped quietly.
Each reader holds at most `limit` bytes of one document (data/compression.py): a DOCX whose parts unpack
past it is refused before it is parsed, a PDF's extracted text is cut off at it."""

from __future__ import annotations

import csv
import io
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

from llmctl.data.compression import TooLarge, bounded_lines, compression_of, open_input, read_bounded
from llmctl.data.documents import Document, SourceProblem
from llmctl.errors import require_extra

PARQUET_BATCH_ROWS = 1024
NO_TEXT_LAYER = "no text layer (a scanned image?); OCR the PDF to include this page"


def read_pdf(path: Path, limit: int) -> Iterator[Document | SourceProblem]:
    """One document per PDF, its pages' text in order; each page without text is reported by number. pypdf
    reads a PDF on disk lazily and caps each stream it decompresses; a compressed PDF is read to the limit."""
    pypdf = require_extra("pypdf", "pdf", "reading PDF files")
    try:
        reader = pypdf.PdfReader(_seekable(path, limit))
        if reader.is_encrypted and not reader.decrypt(""):
            yield SourceProblem(str(path), "encrypted PDF (a password is needed to read its text)")
            return
        pages: list[str] = []
        size = 0
        for number, page in enumerate(reader.pages, start=1):
            text = page.extract_text() or ""
            size += len(text.encode("utf-8", "surrogatepass"))
            if size > limit:
                raise TooLarge(limit)
            if text.strip():
                pages.append(text)
            else:
                yield SourceProblem(f"{path} page {number}", NO_TEXT_LAYER)
    except pypdf.errors.PyPdfError as error:
        yield SourceProblem(str(path), f"unreadable PDF ({error})")
        return
    if pages:
        yield Document(id=str(path), source=str(path), text="\n\n".join(pages))


def read_docx(path: Path, limit: int) -> Iterator[Document | SourceProblem]:
    """A Word document's paragraphs, then its tables a row per line (cells separated by ' | '). A DOCX is a
    zip whose reads stop at each part's declared size, so declared sizes within the limit bound memory."""
    docx = require_extra("docx", "docx", "reading DOCX files")
    from lxml import etree

    try:
        source = _seekable(path, limit)
        source = str(source) if isinstance(source, Path) else source  # python-docx takes str paths only
        with zipfile.ZipFile(source) as archive:
            if sum(part.file_size for part in archive.infolist()) > limit:
                raise TooLarge(limit)
        if isinstance(source, io.BytesIO):
            source.seek(0)
        document = docx.Document(source)
    except (
        docx.opc.exceptions.PackageNotFoundError,
        zipfile.BadZipFile,
        etree.LxmlError,
        ValueError,
        KeyError,
    ) as error:
        yield SourceProblem(str(path), f"unreadable DOCX ({str(error) or type(error).__name__})")
        return
    blocks = [paragraph.text for paragraph in document.paragraphs]
    for table in document.tables:
        blocks.extend(" | ".join(cell.text for cell in row.cells) for row in table.rows)
    text = "\n".join(blocks).strip()
    if text:
        yield Document(id=str(path), source=str(path), text=text)
    else:
        yield SourceProblem(str(path), "no text in the document")


def read_parquet(path: Path, text_field: str, limit: int) -> Iterator[Document | SourceProblem]:
    """A document per row of the `text_field` column, read in batches (a file larger than memory is fine)."""
    require_extra("pyarrow", "parquet", "reading Parquet files")
    import pyarrow
    import pyarrow.parquet as parquet

    try:
        table = parquet.ParquetFile(_seekable(path, limit))
        columns = table.schema_arrow.names
        if text_field not in columns:
            yield SourceProblem(str(path), _no_column(text_field, columns))
            return
        row = 0
        for batch in table.iter_batches(columns=[text_field], batch_size=PARQUET_BATCH_ROWS):
            for value in batch.column(0).to_pylist():
                row += 1
                if isinstance(value, str) and len(value) > limit:
                    yield SourceProblem(f"{path} row {row}", str(TooLarge(limit)))
                    continue
                yield from _row_document(path, row, value, text_field)
    except (pyarrow.ArrowException, OSError) as error:
        yield SourceProblem(str(path), f"unreadable Parquet ({error})")


def read_csv(path: Path, text_field: str, limit: int) -> Iterator[Document | SourceProblem]:
    """A document per row of the `text_field` column (the header names the columns); UTF-8. A line longer
    than the limit stops the file there (TooLarge): the rows before it are kept."""
    csv.field_size_limit(min(sys.maxsize, limit))  # a long document in one cell is normal here
    with open_input(path) as handle:
        lines = _text_lines(handle, limit)
        try:
            reader = csv.DictReader(lines)
            if text_field not in (reader.fieldnames or []):
                yield SourceProblem(str(path), _no_column(text_field, reader.fieldnames or []))
                return
            for row, record in enumerate(reader, start=1):
                yield from _row_document(path, row, record[text_field], text_field)
        except UnicodeDecodeError as error:
            yield SourceProblem(str(path), f"invalid UTF-8 at byte {error.start} (save the CSV as UTF-8)")
        except csv.Error as error:
            yield SourceProblem(f"{path}:{reader.line_num}", f"malformed CSV ({error})")


def _seekable(path: Path, limit: int) -> Path | io.BytesIO:
    """What a reader that seeks can open: the file itself, or a compressed one decompressed up to `limit`."""
    if not compression_of(path):
        return path
    with open_input(path) as handle:
        return io.BytesIO(read_bounded(handle, limit))


def _text_lines(handle, limit: int) -> Iterator[str]:
    for line, _ in bounded_lines(handle, limit):
        if line is None:
            raise TooLarge(limit)
        yield line.decode("utf-8")


def _row_document(path: Path, row: int, value: object, text_field: str) -> Iterator[Document | SourceProblem]:
    if isinstance(value, str) and value.strip():
        yield Document(id=f"{path}:{row}", source=str(path), text=value)
    else:
        yield SourceProblem(f"{path} row {row}", f"no text in column {text_field!r}")


def _no_column(text_field: str, columns: list[str]) -> str:
    return f"no column {text_field!r} (columns: {', '.join(columns) or 'none'}; set --text-field)"
