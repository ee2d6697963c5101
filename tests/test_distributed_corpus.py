"""`corpus build --executor local`: the datatrove path keeps the documents, split and exact-duplicate decisions
of the embedded build, and its MinHash stages catch planted near duplicates without false positives."""

from __future__ import annotations

import json
import random

import pytest
from conftest import SHARED_TECHDOCS as TECHDOCS
from test_corpus import WORDS, prose

from llmctl.data.corpus import CorpusOptions, build_corpus, iter_texts
from llmctl.data.datatrove_stages import build_corpus_distributed
from llmctl.data.executors import EngineSettings


def both(sources: list[str], tmp_path, **options) -> tuple[dict, dict]:
    settings = CorpusOptions(workers=2, **options)
    embedded = build_corpus(sources, tmp_path / "embedded", settings)
    distributed = build_corpus_distributed(
        sources, tmp_path / "datatrove", settings, EngineSettings(tasks=2, workers=2)
    )
    return embedded, distributed


def texts(corpus) -> dict[str, list[str]]:
    return {split: list(iter_texts(corpus, split)) for split in ("train", "val")}


@pytest.mark.slow
@pytest.mark.skipif(not TECHDOCS.is_dir(), reason="the shared techdocs corpus is not here")
def test_on_techdocs_the_datatrove_build_keeps_what_the_embedded_build_keeps(tmp_path):
    train = (TECHDOCS / "train.jsonl").read_text().splitlines()
    copies = tmp_path / "copies.jsonl"  # exact duplicates across files, and within one
    copies.write_text("\n".join([*train[10:40], *train[10:15]]) + "\n")
    sources = [str(TECHDOCS / "train.jsonl"), str(TECHDOCS / "val.jsonl"), str(copies)]
    embedded, distributed = both(sources, tmp_path)
    for key in ("documents_read", "input_bytes", "filtered", "exact_duplicates", "near_duplicates", "splits"):
        assert distributed[key] == embedded[key], key
    assert embedded["exact_duplicates"] >= 30  # 35 copies, less those of documents the filters drop
    assert texts(tmp_path / "datatrove") == texts(tmp_path / "embedded")  # same documents, order and split
    assert distributed["engine"] == {"executor": "local", "tasks": 2, "engine": "datatrove"}


def near_copy(text: str, rng: random.Random) -> str:
    """The text with three words replaced in one place: about 0.9 Jaccard on 5-word shingles."""
    words = text.split(" ")
    at = rng.randrange(len(words) - 3)
    words[at : at + 3] = [rng.choice(WORDS) + "x" for _ in range(3)]
    return " ".join(words)


def test_planted_near_duplicates_are_all_caught_and_distinct_documents_kept(tmp_path):
    rng = random.Random(5)
    originals = [prose(seed, 400) for seed in range(60)]
    planted = {index: near_copy(originals[index], rng) for index in range(0, 60, 4)}
    lines = [{"id": f"o{i}", "text": text} for i, text in enumerate(originals)]
    lines += [{"id": f"c{i}", "text": text} for i, text in planted.items()]
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    embedded, distributed = both([str(source)], tmp_path, val_fraction=0)
    kept = set(texts(tmp_path / "datatrove")["train"])
    assert distributed["near_duplicates"] == len(planted) == embedded["near_duplicates"]
    assert set(originals) <= kept and not set(planted.values()) & kept  # the first of each pair is kept


def test_the_executor_from_the_cli_and_its_bad_input(llmctl, sample_pipeline, tmp_path):
    corpus = sample_pipeline["corpus"]
    out = tmp_path / "out"
    shards = [str(path) for path in sorted(corpus.glob("*.jsonl"))]
    llmctl("corpus", "build", *shards, "--out", str(out), "--executor", "local", "--tasks", "2", check=True)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["engine"]["executor"] == "local" and not list(tmp_path.glob(".*datatrove"))

    wrong = llmctl("corpus", "build", *shards, "--out", str(tmp_path / "x"), "--executor", "spark")
    assert (
        wrong.returncode == 2
        and wrong.stderr.strip() == "error: unknown executor 'spark'; use one of local, slurm, ray"
    )
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "A line that parses."}\n{"text": unquoted}\n')
    strict = llmctl(
        "corpus", "build", *shards, str(bad), "--out", str(tmp_path / "s"), "--executor", "local", "--strict"
    )
    assert strict.returncode == 2 and f"{bad}:2" in strict.stderr and "without --strict" in strict.stderr
    assert len(strict.stderr.strip().splitlines()) == 1, strict.stderr
    assert not (tmp_path / "s").exists() and not list(tmp_path.glob(".*datatrove"))
    later = llmctl("corpus", "build", *shards, "--out", str(tmp_path / "z"), "--executor", "slurm")
    assert later.returncode == 2 and "--executor slurm needs partition and time" in later.stderr
    stub = tmp_path / "stub" / "datatrove"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text('raise ImportError("No module named datatrove")\n')
    missing = llmctl(
        "corpus",
        "build",
        *shards,
        "--out",
        str(tmp_path / "y"),
        "--executor",
        "local",
        pythonpath=[stub.parent],
    )
    assert missing.stderr.strip() == (
        "error: corpus build --executor needs the distributed extra (datatrove): pip install 'llmctl[distributed]'"
    )


def test_one_large_jsonl_file_is_shared_between_tasks_and_builds_as_the_embedded_build(tmp_path):
    rng = random.Random(9)
    originals = [prose(seed, 300) for seed in range(40)]
    lines = [json.dumps({"text": text}) for text in originals]  # no "id": documents are named file:line
    lines[5:5] = [
        json.dumps({"text": originals[30]}),
        "{broken",
        json.dumps({"text": near_copy(originals[2], rng)}),
    ]
    source = tmp_path / "one.jsonl"
    source.write_text("\n".join(lines) + "\n")
    settings = CorpusOptions(workers=2, val_fraction=0.2)
    embedded = build_corpus([str(source)], tmp_path / "embedded", settings)
    engine = EngineSettings(tasks=2, workers=2, settings={"span_bytes": 4096})
    shared = build_corpus_distributed([str(source)], tmp_path / "datatrove", settings, engine)
    for key in ("documents_read", "filtered", "exact_duplicates", "near_duplicates", "splits", "problems"):
        assert shared[key] == embedded[key], key
    assert shared["exact_duplicates"] == 1 and shared["near_duplicates"] == 1
    assert [problem["location"] for problem in shared["problems"]] == [f"{source}:7"]
    for split in ("train", "val"):
        ours, theirs = (
            [
                json.loads(line)
                for path in sorted((tmp_path / name).glob(f"{split}-*.jsonl"))
                for line in path.open()
            ]
            for name in ("datatrove", "embedded")
        )
        assert ours == theirs  # ids (file:line), sources, texts and order
