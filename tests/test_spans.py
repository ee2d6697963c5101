"""A large JSONL file cut into spans reads, span after span, exactly as the whole file: the same records,
problems and line numbers, wherever the cuts fall."""

from __future__ import annotations

import json

import pytest

from llmctl.data.jsonl import jsonl_lines
from llmctl.data.spans import Span, input_spans, split_lines


@pytest.fixture
def awkward(tmp_path):
    lines = [
        json.dumps({"text": "ascii"}),
        "",
        json.dumps({"text": "naïve “quotes” 日本語。"}, ensure_ascii=False),
    ]
    lines += ["{not json", json.dumps({"text": "x" * 300}), "   ", json.dumps({"text": "last, no newline"})]
    path = tmp_path / "docs.jsonl"
    path.write_bytes("\n".join(lines * 5).encode())
    return path


@pytest.mark.parametrize("span_bytes", [1, 2, 7, 40, 333, 1000, 10**6])
def test_spans_read_as_the_whole_file(awkward, span_bytes):
    spans = split_lines(awkward, span_bytes)
    pieces = [
        item for span in spans for item in jsonl_lines(span.path, span.start, span.end, span.first_line)
    ]
    assert pieces == list(jsonl_lines(awkward))
    assert [span.start for span in spans[1:]] == [span.end for span in spans[:-1]] and spans[-1].end is None
    data = awkward.read_bytes()
    assert all(data[span.start - 1 : span.start] == b"\n" for span in spans[1:])  # cuts at line beginnings
    longest = max(len(line) + 1 for line in data.split(b"\n"))
    assert all(span_bytes <= span.end - span.start < span_bytes + longest for span in spans[:-1])
    assert (len(spans) > 1) == (span_bytes + longest < len(data))


def test_only_large_uncompressed_jsonl_is_cut(awkward, tmp_path):
    (tmp_path / "small.jsonl").write_text('{"text": "a"}\n')
    (tmp_path / "notes.txt").write_text("x" * 5000)
    (tmp_path / "big.jsonl.gz").write_bytes(b"\x1f\x8b" + b"x" * 5000)
    paths = [awkward, tmp_path / "big.jsonl.gz", tmp_path / "notes.txt", tmp_path / "small.jsonl"]
    spans = input_spans(paths, 1000)
    assert [span.path for span in spans if span.path != awkward] == paths[1:]
    assert all(span.whole for span in spans if span.path != awkward)
    assert spans[0] == Span(awkward, 0, spans[1].start, 1)
