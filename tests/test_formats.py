"""`corpus build` on the formats companies keep: PDF, DOCX, Parquet, CSV and compressed inputs, all made
here; a page without a text layer and a table row without text are reported, not dropped quietly."""

from __future__ import annotations

import csv
import gzip
import json

import pyarrow
import pyarrow.parquet as parquet
import zstandard
from docx import Document as WordDocument
from pypdf import PdfWriter
from pypdf.generic import DecodedStreamObject, DictionaryObject, NameObject
from test_corpus import lenient, prose

from llmctl.data.corpus import build_corpus, iter_texts
from llmctl.data.formats import NO_TEXT_LAYER

SENTENCES = {
    "pdf": "The torque specification for the flange bolts is forty two newton metres.",
    "docx": "Quarterly maintenance of the hydraulic press requires a certified technician.",
    "parquet": "Customer tickets about billing are routed to the finance queue within an hour.",
    "jsonl.gz": "The backup rotation keeps seven daily and four weekly snapshots of each volume.",
    "txt.zst": "Every contract renewal must be countersigned by the regional legal officer.",
    "csv": "Replace the air filter of the compressor after five hundred operating hours.",
}


def write_pdf(path, lines: list[str], blank_pages: int = 0) -> None:
    """A PDF whose first page draws `lines` in Helvetica (a real text layer), then blank pages (none)."""
    writer = PdfWriter()
    page = writer.add_blank_page(612, 792)
    font = DictionaryObject(
        {
            NameObject("/Type"): NameObject("/Font"),
            NameObject("/Subtype"): NameObject("/Type1"),
            NameObject("/BaseFont"): NameObject("/Helvetica"),
        }
    )
    page[NameObject("/Resources")] = DictionaryObject(
        {NameObject("/Font"): DictionaryObject({NameObject("/F1"): writer._add_object(font)})}
    )
    drawn = "".join(f"({line}) Tj 0 -14 Td " for line in lines)
    content = DecodedStreamObject()
    content.set_data(f"BT /F1 10 Tf 40 760 Td {drawn}ET".encode("latin-1"))
    page[NameObject("/Contents")] = writer._add_object(content)
    for _ in range(blank_pages):
        writer.add_blank_page(612, 792)
    with open(path, "wb") as handle:
        writer.write(handle)


def test_pdf_docx_parquet_csv_and_compressed_inputs_build_into_one_corpus(tmp_path):
    source = tmp_path / "in"
    source.mkdir()
    body = {
        kind: f"{sentence} {prose(index, 60)}" for index, (kind, sentence) in enumerate(SENTENCES.items())
    }

    write_pdf(source / "manual.pdf", [body["pdf"][i : i + 90] for i in range(0, len(body["pdf"]), 90)], 1)
    word = WordDocument()
    word.add_heading("Press maintenance", level=1)
    word.add_paragraph(body["docx"])
    word.add_table(rows=1, cols=2).rows[0].cells[0].text = "Interval"
    word.save(source / "procedure.docx")
    parquet.write_table(
        pyarrow.table({"id": [1, 2], "body": [body["parquet"], None]}), source / "tickets.parquet"
    )
    with gzip.open(source / "ops.jsonl.gz", "wt") as handle:
        handle.write(json.dumps({"body": body["jsonl.gz"]}) + "\n")
    (source / "legal.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(body["txt.zst"].encode()))
    with (source / "service.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["part", "body"])
        writer.writeheader()
        writer.writerow({"part": "compressor", "body": body["csv"]})

    manifest = build_corpus([str(source)], tmp_path / "out", lenient(text_field="body", val_fraction=0))
    texts = list(iter_texts(tmp_path / "out", "train"))
    joined = "\n".join(texts)
    for kind, sentence in SENTENCES.items():
        assert sentence in " ".join(joined.split()), f"{kind}: {sentence!r} is not in the corpus"
    assert "Interval" in joined  # table cells are text too
    assert len(texts) == 6 and manifest["documents_read"] == 6

    problems = {problem["location"]: problem["reason"] for problem in manifest["problems"]}
    assert problems == {
        f"{source / 'manual.pdf'} page 2": NO_TEXT_LAYER,
        f"{source / 'tickets.parquet'} row 2": "no text in column 'body'",
    }
    assert manifest["skipped_inputs"] == 2


def test_unreadable_and_mislabelled_inputs_are_each_one_problem(tmp_path):
    source = tmp_path / "in"
    source.mkdir()
    (source / "good.txt").write_text(prose(1))
    (source / "broken.pdf").write_bytes(b"%PDF-1.4 this is not really a pdf")
    (source / "broken.docx").write_bytes(b"not a zip file")
    lines = "".join(json.dumps({"text": prose(seed, 40)}) + "\n" for seed in range(20)).encode()
    whole = gzip.compress(lines)
    (source / "cut.jsonl.gz").write_bytes(whole[: len(whole) // 2])  # a copy that stopped half-way
    write_pdf(source / "scanned.pdf", [], blank_pages=1)
    with (source / "columns.csv").open("w") as handle:
        handle.write("title,summary\nA,B\n")
    manifest = build_corpus([str(source)], tmp_path / "out", lenient())
    reasons = {problem["location"].rsplit("/", 1)[-1]: problem["reason"] for problem in manifest["problems"]}
    assert reasons["broken.pdf"].startswith("unreadable PDF")
    assert reasons["broken.docx"].startswith("unreadable DOCX")
    assert reasons["cut.jsonl.gz"].startswith("unreadable")
    assert reasons["scanned.pdf page 1"] == NO_TEXT_LAYER
    assert reasons["scanned.pdf page 2"] == NO_TEXT_LAYER
    assert reasons["columns.csv"] == "no column 'text' (columns: title, summary; set --text-field)"
    assert len(reasons) == 6 and manifest["skipped_inputs"] == 6
    assert 1 < manifest["documents_read"] < 21  # good.txt and the lines before the cut


def test_a_missing_format_extra_is_one_line_naming_it(tmp_path, llmctl):
    stub = tmp_path / "stub"
    (stub / "pypdf").mkdir(parents=True)
    (stub / "pypdf" / "__init__.py").write_text('raise ImportError("No module named pypdf")\n')
    source = tmp_path / "in"
    source.mkdir()
    (source / "notes.txt").write_text(prose(2))
    write_pdf(source / "manual.pdf", ["A page of text."])
    result = llmctl("corpus", "build", str(source), "--out", str(tmp_path / "out"), pythonpath=[stub])
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert (
        result.stderr.strip()
        == "error: reading PDF files needs the pdf extra (pypdf): pip install 'llmctl[pdf]'"
    )
    assert not (tmp_path / "out").exists()


PAGE = """<html><head><title>Flange bolts</title><script>track()</script></head><body>
<div class="menu"><ul><li><a href="/">Home</a></li><li><a href="/careers">Careers at ACME</a></li></ul></div>
<main><article><h1>Tightening flange bolts</h1>
<p>{body}</p>
<table><tr><td>Bolt size</td><td>Torque</td></tr><tr><td>M12</td><td>42 Nm</td></tr></table>
</article></main>
<aside class="sidebar"><h3>Related products</h3><ul><li><a href="/x">Torque wrench deals</a></li></ul></aside>
<div class="cookie-banner">We use cookies to improve your experience. Accept all cookies.</div>
</body></html>"""


def test_html_keeps_the_main_content_unless_asked_for_all_visible_text(tmp_path, llmctl):
    source = tmp_path / "in"
    source.mkdir()
    (source / "page.html").write_text(PAGE.format(body=f"{SENTENCES['pdf']} {prose(3, 60)}"))
    texts = {}
    for mode in ("main", "all"):
        build_corpus([str(source)], tmp_path / mode, lenient(html=mode, val_fraction=0))
        (texts[mode],) = iter_texts(tmp_path / mode, "train")
    for mode, text in texts.items():
        assert SENTENCES["pdf"] in text and "42 Nm" in text, mode
    for boilerplate in ("Careers at ACME", "Torque wrench deals", "Accept all cookies"):
        assert boilerplate not in texts["main"] and boilerplate in texts["all"], boilerplate

    stub = tmp_path / "stub"
    (stub / "trafilatura").mkdir(parents=True)
    (stub / "trafilatura" / "__init__.py").write_text('raise ImportError("No module named trafilatura")\n')
    result = llmctl("corpus", "build", str(source), "--out", str(tmp_path / "out"), pythonpath=[stub])
    assert (
        result.returncode == 2 and "--html all for all visible text" in result.stderr.strip().splitlines()[-1]
    )
    assert llmctl("corpus", "build", str(source), "--out", str(tmp_path / "out"), "--html", "all",
                  "--min-chars", "10", pythonpath=[stub]).returncode == 0  # fmt: skip
