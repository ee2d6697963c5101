"""`tokenize train|encode|show`: special tokens, domain terms, shards and their no-op re-run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llmctl.data.corpus import iter_texts
from llmctl.data.token_files import encode_corpus, read_meta
from llmctl.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, open_tokenizer, train_tokenizer
from llmctl.data.tokenizer_base import CHAT_MARKERS
from llmctl.errors import UserError


def test_tokenizer_layout_round_trip_and_byte_fallback(sample_pipeline):
    tok = open_tokenizer(sample_pipeline["tokenizer"])
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (BOS_ID, EOS_ID, PAD_ID, 1024)
    text = "def f(x):\n\treturn x  # naïve ✓ 日本\n"
    assert tok.decode(tok.encode(text)) == text
    for marker in CHAT_MARKERS:
        assert tok.pieces(f"{marker}hi").count(marker) == 1
    code = "def f(x):\n    if x:\n        return x\n\n\nclass A:\n  pass\n"
    pieces = tok.pieces(code)  # blank lines are one piece
    assert {"\n", "\n\n\n"} <= set(pieces) and tok.decode(tok.encode(code)) == code


def test_domain_terms_are_kept_whole_and_fertility_compared(sample_pipeline, tmp_path):
    terms = tmp_path / "terms.txt"
    terms.write_text("# domain terms\nasyncio.TaskGroup\n__init_subclass__\n")
    report = train_tokenizer(sample_pipeline["corpus"], tmp_path / "tok", 1024, domain_terms=terms)
    assert report["domain_terms"] == 2 and report["domain_terms_kept_whole"] == 2
    assert report["fertility"] > 1.0 and report["fertility_without_domain_terms"] > 1.0
    tok = open_tokenizer(tmp_path / "tok" / "tokenizer.model")
    assert "asyncio.TaskGroup" in tok.pieces("use asyncio.TaskGroup here")


def test_the_report_names_the_characters_that_fall_back_to_bytes(tmp_path):
    from test_corpus import prose, write_jsonl

    from llmctl.data.corpus import CorpusOptions, build_corpus

    documents = [prose(seed) for seed in range(60)]
    documents[0] += " a snowman ☃ and ☃ again, and one ᚠ rune."
    source = write_jsonl(tmp_path / "docs.jsonl", documents)
    build_corpus([str(source)], tmp_path / "corpus", CorpusOptions(val_fraction=0.0, near_dup_threshold=None))
    report = train_tokenizer(tmp_path / "corpus", tmp_path / "tok", 600)
    fallback = report["byte_fallback"]
    reported = dict(fallback["most_frequent"])
    assert reported["☃"] == 2 and reported["ᚠ"] == 1 and fallback["characters"] == len(reported)
    tok = open_tokenizer(tmp_path / "tok" / "tokenizer.model")
    for char in reported:  # each costs its UTF-8 bytes as tokens; covered characters are one piece
        assert tok.pieces(char)[-len(char.encode()) :] == [f"<0x{byte:02X}>" for byte in char.encode()]
    assert not any(piece.startswith("<0x") for piece in tok.pieces("quiet"))
    text = "".join(iter_texts(tmp_path / "corpus", "train")).replace("\n", "")
    assert fallback["share_of_text"] == pytest.approx(sum(reported.values()) / len(text))


def test_encoded_shards_hold_every_document_separated_by_eos(sample_pipeline):
    meta = read_meta(sample_pipeline["tokens"])
    tok = open_tokenizer(sample_pipeline["tokenizer"])
    assert meta["dtype"] == "uint16" and meta["tokenizer_sha256"] == tok.sha256()
    tokens = np.fromfile(sample_pipeline["tokens"] / "val.bin", dtype=np.uint16)
    texts = list(iter_texts(sample_pipeline["corpus"], "val"))
    expected = [token for text in texts for token in [*tok.encode(text), EOS_ID]]
    assert tokens.tolist() == expected
    assert meta["tokens"]["val"] == len(expected) and meta["documents"]["val"] == len(texts)


def test_reencoding_unchanged_inputs_is_a_no_op(sample_pipeline):
    before = (sample_pipeline["tokens"] / "train.bin").stat().st_mtime_ns
    meta = encode_corpus(sample_pipeline["corpus"], sample_pipeline["tokenizer"], sample_pipeline["tokens"])
    assert meta["up_to_date"] is True
    assert (sample_pipeline["tokens"] / "train.bin").stat().st_mtime_ns == before


def test_missing_tokenizer_is_a_clear_error(sample_pipeline, tmp_path, llmctl_in_process):
    with pytest.raises(UserError, match="tokenizer not found"):
        encode_corpus(sample_pipeline["corpus"], tmp_path / "nope.model", tmp_path / "tokens")
    (tmp_path / "vocab.model").write_text("not a sentencepiece model")
    result = llmctl_in_process("tokenize", "show", str(tmp_path / "vocab.model"), "hello")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "is not a sentencepiece model" in line


def test_a_damaged_token_file_is_never_up_to_date_and_never_trained_on(sample_pipeline, tmp_path):
    from llmctl.data.loader import TokenFile

    tokens = tmp_path / "tokens"
    encode_corpus(sample_pipeline["corpus"], sample_pipeline["tokenizer"], tokens)
    train_bin = tokens / "train.bin"
    train_bin.write_bytes(train_bin.read_bytes()[:1000])  # a copy cut short
    with pytest.raises(UserError, match="train.bin has 1,000 bytes"):
        TokenFile(tokens, "train")
    with pytest.raises(UserError, match="pass --overwrite"):
        encode_corpus(sample_pipeline["corpus"], sample_pipeline["tokenizer"], tokens)
    meta = encode_corpus(sample_pipeline["corpus"], sample_pipeline["tokenizer"], tokens, overwrite=True)
    assert not meta["up_to_date"] and len(TokenFile(tokens, "train")) == meta["tokens"]["train"]


def test_tokenize_show_prints_pieces_and_ids(sample_pipeline, llmctl_in_process):
    out = llmctl_in_process(
        "tokenize", "show", str(sample_pipeline["tokenizer"]), "import os", check=True
    ).stdout
    tok = open_tokenizer(sample_pipeline["tokenizer"])
    for piece, token_id in zip(tok.pieces("import os"), tok.encode("import os"), strict=True):
        assert repr(piece) in out and str(token_id) in out


def test_cli_pipeline_end_to_end(tmp_path, llmctl_in_process):
    from conftest import SAMPLE

    llmctl_in_process(
        "corpus",
        "build",
        str(SAMPLE / "val.jsonl"),
        "--out",
        str(tmp_path / "corpus"),
        "--val-fraction",
        "0.3",
        check=True,
    )
    manifest = json.loads((tmp_path / "corpus" / "manifest.json").read_text())
    assert manifest["documents_read"] == 10
    stats = llmctl_in_process("corpus", "stats", str(tmp_path / "corpus"), check=True).stdout
    assert "document length" in stats and "near duplicates" in stats
    llmctl_in_process("tokenize", "train", str(tmp_path / "corpus"), "--vocab", "512", check=True)
    encode = (
        "tokenize",
        "encode",
        str(tmp_path / "corpus"),
        "-t",
        str(tmp_path / "tokenizer" / "tokenizer.model"),
    )
    assert "MB/s" in llmctl_in_process(*encode, check=True).stdout
    assert "up to date" in llmctl_in_process(*encode, check=True).stdout


@pytest.mark.parametrize("command", ["corpus build", "tokenize train", "tokenize encode", "eval suite build"])
def test_writing_commands_never_replace_an_input_or_an_unrelated_folder(
    command, sample_pipeline, tmp_path, llmctl_in_process
):
    corpus, tokenizer = sample_pipeline["corpus"], sample_pipeline["tokenizer"]
    before = {path: path.read_bytes() for path in corpus.iterdir()}
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "notes.txt").write_text("a user's file " * 40)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("precious")
    arguments = {
        "corpus build": [str(docs)],
        "tokenize train": [str(corpus), "--vocab", "512"],
        "tokenize encode": [str(corpus), "--tokenizer", str(tokenizer)],
        "eval suite build": [str(corpus)],
    }[command]
    inputs = docs if command == "corpus build" else corpus
    for out, extra in ((inputs, ["--overwrite"]), (inputs / "out", ["--overwrite"]), (mine, [])):
        result = llmctl_in_process(*command.split(), *arguments, "--out", str(out), *extra)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        message = result.stderr.strip()
        assert ("overlaps the input" in message) if out != mine else ("pass --overwrite" in message)
    assert (docs / "notes.txt").is_file() and (mine / "keep.txt").read_text() == "precious"
    assert {path: path.read_bytes() for path in corpus.iterdir()} == before and not (inputs / "out").exists()
