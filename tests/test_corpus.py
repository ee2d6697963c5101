"""`corpus build`: cleaning, filters, PII, deduplication, bad input and atomic output."""

from __future__ import annotations

import json
import random

import pytest

from llmctl.data.clean import CleaningRules, clean_text
from llmctl.data.corpus import CorpusOptions, assign_split, build_corpus, iter_texts
from llmctl.data.filters import FilterRules
from llmctl.data.pii import scrub_pii
from llmctl.data.sources import html_to_text
from llmctl.errors import UserError

WORDS = [
    "parser",
    "module",
    "function",
    "returns",
    "value",
    "object",
    "list",
    "dictionary",
    "string",
    "buffer",
    "socket",
    "thread",
    "process",
    "queue",
    "event",
    "handler",
    "config",
    "option",
    "default",
    "error",
    "exception",
    "file",
    "path",
    "stream",
    "encode",
    "decode",
    "format",
]


def prose(seed: int, n_words: int = 400) -> str:
    rng = random.Random(seed)
    sentences = []
    for _ in range(n_words // 10):
        sentences.append(" ".join(rng.choice(WORDS) for _ in range(10)).capitalize() + ".")
    return "\n\n".join(" ".join(sentences[i : i + 4]) for i in range(0, len(sentences), 4))


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    return path


def lenient(**overrides) -> CorpusOptions:
    filters = FilterRules(min_chars=10, max_repeated_ngram_fraction=1.0, max_repeated_line_fraction=1.0)
    return CorpusOptions(**{"filters": filters, "workers": 1, **overrides})


def test_exact_and_near_duplicates_are_removed(tmp_path):
    original = prose(1)
    words = original.split(" ")
    for index in (5, 60, 200):  # a few words changed
        words[index] = "CHANGED"
    near = " ".join(words)
    exact = "  " + original.upper().replace(" ", "   ") + "\n"  # same text modulo case and whitespace
    source = write_jsonl(tmp_path / "docs.jsonl", [original, exact, near, prose(2), prose(3)])
    manifest = build_corpus([str(source)], tmp_path / "out", lenient())
    assert manifest["exact_duplicates"] == 1
    assert manifest["near_duplicates"] == 1
    kept = [*iter_texts(tmp_path / "out", "train"), *iter_texts(tmp_path / "out", "val")]
    assert len(kept) == 3 and original in kept and near not in kept


def test_distinct_documents_are_not_deduplicated(tmp_path):
    source = write_jsonl(tmp_path / "docs.jsonl", [prose(seed) for seed in range(20)])
    manifest = build_corpus([str(source)], tmp_path / "out", lenient())
    assert manifest["near_duplicates"] == 0 and manifest["exact_duplicates"] == 0
    assert sum(split["documents"] for split in manifest["splits"].values()) == 20


def test_pii_is_scrubbed_and_counted(tmp_path):
    text = (
        "Contact jane.doe@example.com or call +1 415-555-0132 about card 4111 1111 1111 1111. "
        "The server at 192.168.10.42 logged it. Version 3.11.2 and order 1234 are not PII.\n" + prose(4)
    )
    scrubbed, counts = scrub_pii(text)
    assert "<EMAIL>" in scrubbed and "jane.doe" not in scrubbed
    assert "<PHONE>" in scrubbed and "555-0132" not in scrubbed
    assert "<CREDIT_CARD>" in scrubbed and "4111" not in scrubbed
    assert "<IP_ADDRESS>" in scrubbed and "192.168" not in scrubbed
    assert "3.11.2" in scrubbed and "order 1234" in scrubbed
    assert counts == {"EMAIL": 1, "PHONE": 1, "CREDIT_CARD": 1, "IP_ADDRESS": 1}
    source = write_jsonl(tmp_path / "docs.jsonl", [text])
    manifest = build_corpus([str(source)], tmp_path / "out", lenient(scrub_pii=True))
    assert manifest["pii_replaced"] == counts


def test_card_numbers_failing_luhn_are_kept():
    assert scrub_pii("ticket 1234 5678 9012 3456 closed")[1]["CREDIT_CARD"] == 0


def test_malformed_jsonl_line_is_reported_with_its_line_number(tmp_path):
    source = tmp_path / "docs.jsonl"
    source.write_text(
        json.dumps({"text": prose(5)})
        + "\n{not json\n"
        + json.dumps({"body": "x"})
        + "\n"
        + json.dumps({"text": prose(6)})
        + "\n"
    )
    manifest = build_corpus([str(source)], tmp_path / "out", lenient())
    assert manifest["skipped_inputs"] == 2
    locations = [problem["location"] for problem in manifest["problems"]]
    assert locations == [f"{source}:2", f"{source}:3"]
    assert "malformed JSON" in manifest["problems"][0]["reason"]
    with pytest.raises(UserError, match=rf"{source}:2: malformed JSON"):
        build_corpus([str(source)], tmp_path / "strict", lenient(strict=True))
    assert not (tmp_path / "strict").exists()


def test_malformed_line_with_strict_is_one_line_exit_2_from_the_cli(tmp_path, llmctl_in_process):
    source = tmp_path / "docs.jsonl"
    source.write_text(json.dumps({"text": prose(5)}) + "\n{broken\n")
    result = llmctl_in_process("corpus", "build", str(source), "--out", str(tmp_path / "out"), "--strict")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and f"{source}:2" in result.stderr
    assert not (tmp_path / "out").exists()


def test_binary_and_invalid_utf8_files_are_skipped(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "good.txt").write_text(prose(7))
    (tmp_path / "in" / "blob.txt").write_bytes(b"abc\x00\x01\x02" * 100)
    (tmp_path / "in" / "latin1.md").write_bytes("caf\xe9 ".encode("latin-1") * 100)
    (tmp_path / "in" / "data.json").write_text('{"a": 1}')
    (tmp_path / "in" / "guide.rst").write_text(prose(8))
    (tmp_path / "in" / ".git").mkdir()
    (tmp_path / "in" / ".git" / "HEAD").write_text("ref: refs/heads/main")
    manifest = build_corpus([str(tmp_path / "in")], tmp_path / "out", lenient())
    reasons = sorted(problem["reason"].split(" ")[0] for problem in manifest["problems"])
    assert reasons == ["binary", "invalid", "unsupported"]  # every input is accounted for; .git is not input
    assert manifest["documents_read"] == 2 and manifest["skipped_inputs"] == 3


def test_inputs_that_yield_no_document_are_an_error_and_write_nothing(tmp_path, llmctl_in_process):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "blob.txt").write_bytes(b"abc\x00" * 100)
    (tmp_path / "in" / "data.json").write_text("{}")
    result = llmctl_in_process("corpus", "build", str(tmp_path / "in"), "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "no documents kept: 0 read" in line and "2 inputs skipped" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_interrupted_build_leaves_no_output_directory(tmp_path):
    source = write_jsonl(tmp_path / "docs.jsonl", [prose(seed) for seed in range(30)])
    seen = []

    def interrupt_midway(_bytes: int) -> None:
        seen.append(1)
        if len(seen) == 10:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_corpus([str(source)], tmp_path / "out", lenient(workers=2), on_progress=interrupt_midway)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl"]


def test_existing_output_needs_overwrite(tmp_path):
    source = write_jsonl(tmp_path / "docs.jsonl", [prose(8)])
    build_corpus([str(source)], tmp_path / "out", lenient())
    with pytest.raises(UserError, match="--overwrite"):
        build_corpus([str(source)], tmp_path / "out", lenient())
    build_corpus([str(source)], tmp_path / "out", lenient(), overwrite=True)


def test_cleaning_repairs_mojibake_control_characters_and_line_breaks(tmp_path):
    broken = "The cafÃ© said \x07hello\x0b  \r\nagain.   \n\n\n\n" + prose(9)
    source = write_jsonl(tmp_path / "docs.jsonl", [broken])
    manifest = build_corpus([str(source)], tmp_path / "out", lenient(val_fraction=0.0))
    (text,) = iter_texts(tmp_path / "out", "train")
    assert text.startswith("The café said hello  \nagain.   \n\n\n\n")  # whitespace is the author's
    cleaned = manifest["characters_cleaned"]
    # "Ã©" (2 characters) became "é"; \x07 and \x0b went; \r\n became \n
    assert (
        cleaned["fix_mojibake"] == 2
        and cleaned["remove_control_chars"] == 2
        and cleaned["fix_line_breaks"] == 1
    )
    assert "uncurl_quotes" not in cleaned  # rewrites of valid text are off unless asked for


TYPOGRAPHY = "It‘s “quoted” — wait… 全角，。！ and 10\u00a0km, ﬁne ＡＢＣ &amp; more."


def test_valid_unicode_survives_corpus_build_byte_identical(tmp_path):
    document = TYPOGRAPHY + "\n\n" + prose(11)
    source = write_jsonl(tmp_path / "docs.jsonl", [document, "Mojibake: donâ€™t panic. " + prose(12)])
    manifest = build_corpus([str(source)], tmp_path / "out", lenient(val_fraction=0.0))
    texts = list(iter_texts(tmp_path / "out", "train"))
    assert texts[0].encode() == document.encode()
    assert texts[1].startswith("Mojibake: don’t panic.")
    assert manifest["characters_cleaned"]["fix_mojibake"] == 3  # "â€™" became "’"
    assert sum(manifest["characters_cleaned"].values()) == 3


def test_each_rewrite_of_valid_text_is_a_named_rule(tmp_path):
    rewrites = (
        "uncurl_quotes",
        "fix_character_width",
        "fix_latin_ligatures",
        "nbsp_to_space",
        "unescape_html",
    )
    rules = CleaningRules(**dict.fromkeys(rewrites, True))
    text, changed = clean_text(TYPOGRAPHY, rules)
    assert text == 'It\'s "quoted" — wait… 全角,。! and 10 km, fine ABC & more.'
    assert changed == {
        "uncurl_quotes": 3,
        "fix_character_width": 5,
        "fix_latin_ligatures": 2,
        "nbsp_to_space": 1,
        "unescape_html": 4,  # "amp;" removed
    }
    whitespace = CleaningRules(strip_trailing_spaces=True, collapse_blank_lines=True, remove_zero_width=True)
    text, changed = clean_text("a  \n\n\n\nb\u200bc", whitespace)
    assert text == "a\n\nbc"
    assert changed == {"strip_trailing_spaces": 2, "collapse_blank_lines": 2, "remove_zero_width": 1}


def test_quality_filters_each_count_what_they_removed(tmp_path):
    docs = ["short", "1234 5678 " * 100, "same line\n" * 100, prose(10)]
    source = write_jsonl(tmp_path / "docs.jsonl", docs)
    manifest = build_corpus([str(source)], tmp_path / "out", CorpusOptions(workers=1))
    assert manifest["filtered"] == {"too_short": 1, "low_alpha_fraction": 1, "repeated_lines": 1}


def test_split_is_by_document_content_and_seeded():
    keys = [f"doc-{i}" for i in range(2000)]
    val = [key for key in keys if assign_split(key, seed=0, val_fraction=0.1) == "val"]
    assert 150 < len(val) < 250
    assert val == [key for key in keys if assign_split(key, seed=0, val_fraction=0.1) == "val"]
    assert val != [key for key in keys if assign_split(key, seed=1, val_fraction=0.1) == "val"]


def test_html_is_converted_to_visible_text():
    html = "<html><head><style>p{}</style><script>var x;</script></head><body><nav>menu</nav><h1>Title</h1><p>Body &amp; text.</p></body></html>"
    text = html_to_text(html)
    assert "Title" in text and "Body & text." in text
    assert "var x" not in text and "menu" not in text


def test_zero_thresholds_from_the_cli_switch_filters_off(tmp_path, llmctl_in_process):
    source = write_jsonl(tmp_path / "docs.jsonl", ["tiny", " ".join(str(n) for n in range(300))])
    out = tmp_path / "out"
    llmctl_in_process(
        "corpus",
        "build",
        str(source),
        "--out",
        str(out),
        "--min-chars",
        "0",
        "--min-alpha-fraction",
        "0",
        check=True,
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["filtered"] == {} and manifest["options"]["filters"]["min_chars"] == 0


def test_corpus_stats_shows_what_each_cleaning_rule_changed(tmp_path, llmctl_in_process):
    source = write_jsonl(tmp_path / "docs.jsonl", ["Mojibake: donâ€™t panic. " + prose(13)])
    llmctl_in_process(
        "corpus", "build", str(source), "--out", str(tmp_path / "out"), "--val-fraction", "0", check=True
    )
    out = llmctl_in_process("corpus", "stats", str(tmp_path / "out"), check=True).stdout
    assert any("fix_mojibake" in line and line.rstrip(" │").endswith("3") for line in out.splitlines())


def test_a_threshold_out_of_range_is_one_line(tmp_path, llmctl_in_process):
    source = write_jsonl(tmp_path / "docs.jsonl", [prose(14)])
    result = llmctl_in_process(
        "corpus", "build", str(source), "--out", str(tmp_path / "out"), "--min-alpha-fraction", "2"
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: --min-alpha-fraction 2.0: input should be less than or equal to 1"
    ]
    assert not (tmp_path / "out").exists()
