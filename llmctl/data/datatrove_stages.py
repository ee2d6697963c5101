"""`corpus build --executor local|ray|slurm`: the same build as data/corpus.py, run as datatrove stages
(data/executors.py runs each on the chosen executor) with bounded memory per task; and `tokenize encode
--per-shard --executor ...`, one stage whose tasks encode every N-th corpus shard.

1. process (N tasks): read the inputs (task r takes spans r, r+N, ...: whole files, and large JSONL files cut
   at lines, data/spans.py), clean, filter, scrub; kept candidates go to processed/r.jsonl with their global
   order (span index, document index) and exact key.
2. exact duplicates (N tasks): stage 1 files each exact key (with its order) under the task its hash names;
   task r keeps each of its keys' first document by global order, the one the embedded build keeps.
3-6. near duplicates: datatrove's MinHash stages (signatures, buckets, clusters, filter) over what survived.
7. merge (1 task): the survivors, merged back into global order, assigned to splits by content as the
   embedded build does, and written as the same shards and manifest.

Exact-duplicate decisions, the kept documents and the split equal the embedded build's; near duplicates are
datatrove's clusters (one kept per cluster) rather than the embedded index's greedy pass, so on chains of
similar documents the two may keep different members.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from functools import partial
from pathlib import Path

from datatrove.data import Document as EngineDocument
from datatrove.pipeline.dedup import (
    MinhashConfig,
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupFilter,
    MinhashDedupSignature,
)
from datatrove.utils.word_tokenizers import WordTokenizer

from llmctl.atomic import atomic_directory, check_output
from llmctl.data.corpus import (
    SPLITS,
    CorpusOptions,
    ShardWriter,
    assign_split,
    finish_corpus,
    process_document,
    skip_problem,
    split_files,
)
from llmctl.data.documents import Document, SourceProblem
from llmctl.data.executors import EngineSettings, check_executor, engine_session, run_stage
from llmctl.data.sources import expand_sources, read_span
from llmctl.data.spans import Span, input_spans
from llmctl.data.tally import CorpusTally
from llmctl.data.token_files import TokenEncoder, encode_shard, token_dtype
from llmctl.data.tokenizer import open_tokenizer
from llmctl.errors import UserError

HASHES_PER_BUCKET = 8


def encode_shards_distributed(
    corpus: Path, tokenizer_path: Path, directory: Path, engine: EngineSettings, threads: int
) -> dict[str, list[dict]]:
    """`tokenize encode --per-shard` as one datatrove stage: task r encodes shards r, r + N, ... of all splits
    into `directory`; each split's meta.json entries come back in shard order."""
    check_executor(engine)
    corpus, tokenizer_path, directory = corpus.resolve(), tokenizer_path.resolve(), directory.resolve()
    sources = [(split, path) for split in SPLITS for path in split_files(corpus, split)]
    work = directory.parent / f".{directory.name}.datatrove"
    shutil.rmtree(work, ignore_errors=True)
    tasks = max(1, min(engine.tasks, len(sources)))
    per_task_threads = threads if engine.workers == 1 else 1  # the tasks share the cores
    step = partial(
        encode_task,
        sources=sources,
        tokenizer_path=tokenizer_path,
        directory=directory,
        threads=per_task_threads,
        work=work,
    )
    with engine_session(engine, work / "logs"):
        run_stage("encode", [step], tasks, engine, work)
    entries = {}
    for path in sorted((work / "encoded").glob("*.json")):
        entries.update({(entry["split"], entry["source"]): entry for entry in json.loads(path.read_text())})
    shutil.rmtree(work, ignore_errors=True)
    return {
        split: [
            {k: v for k, v in entries[(split, path.name)].items() if k != "split"}
            for path in split_files(corpus, split)
        ]
        for split in SPLITS
    }


def encode_task(
    data,
    rank: int,
    world_size: int,
    sources: list,
    tokenizer_path: Path,
    directory: Path,
    threads: int,
    work: Path,
) -> Iterator:
    """One encode task: its share of the shards, each to its own token file; its entries to work/encoded."""
    tokenizer = open_tokenizer(tokenizer_path)
    encoder = TokenEncoder(tokenizer, token_dtype(tokenizer.vocab_size), threads, None)
    done = [
        {"split": split, **encode_shard(encoder, path, directory)}
        for split, path in sources[rank::world_size]
    ]
    target = _task_file(work / "encoded", rank).with_suffix(".json")
    target.write_text(json.dumps(done))
    yield from ()


def minhash_buckets(threshold: float) -> int:
    """Bands of 8 hashes whose LSH curve turns at about `threshold` Jaccard similarity: (1/b)^(1/8) = t."""
    return max(1, round(threshold**-HASHES_PER_BUCKET))


def build_corpus_distributed(
    sources: list[str], out: Path, options: CorpusOptions, engine: EngineSettings, overwrite: bool = False
) -> dict:
    """Build the corpus at `out` through datatrove; its working files live beside it until the build ends."""
    check_executor(engine)
    out = Path(out)
    paths, unsupported = expand_sources(sources)
    check_output(out, [*paths, *(Path(source) for source in sources if Path(source).exists())], overwrite)
    tally = CorpusTally()
    for item in unsupported:
        skip_problem(item, tally, options.strict)
    work = out.resolve().parent / f".{out.name}.datatrove"  # absolute: tasks may run in another directory
    shutil.rmtree(work, ignore_errors=True)
    started = time.perf_counter()
    with engine_session(engine, work / "logs"):
        for name, pipeline, tasks in _stages(paths, options, engine, work):
            run_stage(name, pipeline, tasks, engine, work)
            if name == "process" and options.strict:  # --strict stops before any deduplication stage runs
                _stop_at_a_problem(work)
    for path in sorted((work / "tallies").glob("*.json")):
        tally.add(CorpusTally.from_json(json.loads(path.read_text())))
    passed = tally.documents_read - tally.filtered.total()
    with atomic_directory(out) as staging:
        writers = {split: ShardWriter(staging, split, options.shard_bytes) for split in SPLITS}
        survivors = 0
        for record in heapq.merge(*map(_records, sorted((work / "survivors").glob("*.jsonl"))), key=_order):
            tally.kept(record["source"], Counter(record["pii"]))
            split = assign_split(record["exact"], options.seed, options.val_fraction)
            writers[split].write(Document(record["id"], record["source"], record["text"]))
            survivors += 1
        tally.near_duplicates = passed - tally.exact_duplicates - survivors
        described = {"executor": engine.executor, "tasks": engine.tasks, "engine": "datatrove"}
        manifest = finish_corpus(
            staging, writers, tally, paths, options, time.perf_counter() - started, described
        )
    shutil.rmtree(work, ignore_errors=True)
    return manifest


def _stages(paths: list[Path], options: CorpusOptions, engine: EngineSettings, work: Path) -> list:
    spans = input_spans(paths, engine.span_bytes)
    stages = [
        (
            "process",
            [partial(process_inputs, spans=spans, options=options, work=work, directory=Path.cwd())],
            engine.tasks,
        )
    ]
    if options.exact_dedup:
        stages.append(("exact", [partial(find_exact_duplicates, work=work)], engine.tasks))
    kept = partial(read_kept, work=work, exact=options.exact_dedup)
    survivors = partial(write_survivors, work=work)
    if options.near_dup_threshold is None:
        return [*stages, ("survivors", [kept, survivors], engine.tasks)]
    config = MinhashConfig(
        num_buckets=minhash_buckets(options.near_dup_threshold), hashes_per_bucket=HASHES_PER_BUCKET
    )
    minhash = work / "minhash"
    signatures = MinhashDedupSignature(
        output_folder=str(minhash / "signatures"), config=config, language=WhitespaceWords()
    )
    buckets = MinhashDedupBuckets(
        input_folder=str(minhash / "signatures"), output_folder=str(minhash / "buckets"), config=config
    )
    clusters = MinhashDedupCluster(
        input_folder=str(minhash / "buckets"), output_folder=str(minhash / "remove"), config=config
    )
    near_filter = MinhashDedupFilter(input_folder=str(minhash / "remove"))
    return [
        *stages,
        ("signatures", [kept, signatures], engine.tasks),
        ("buckets", [buckets], config.num_buckets),
        ("clusters", [clusters], 1),
        ("survivors", [kept, near_filter, survivors], engine.tasks),
    ]


def _stop_at_a_problem(work: Path) -> None:
    """Under --strict: an unreadable input or malformed line the process stage met (the lowest task's first)
    as the error, its working files removed: the embedded build leaves nothing behind either."""
    for path in sorted((work / "tallies").glob("process-*.json")):
        problems = CorpusTally.from_json(json.loads(path.read_text())).problems
        if problems:
            shutil.rmtree(work, ignore_errors=True)
            first = problems[0]
            raise UserError(
                f"{first['location']}: {first['reason']} (without --strict such inputs are skipped)"
            )


def process_inputs(
    data, rank: int, world_size: int, spans: list[Span], options: CorpusOptions, work: Path, directory: Path
) -> Iterator:
    """Stage 1: this task's share of the inputs (spans r, r + N, ...), processed as the embedded build
    processes them; a document's order is (span, position in the span), which sorts as the inputs do.
    The task reads from `directory`, where llmctl started: a Ray worker starts elsewhere, and relative
    inputs must name their documents as the embedded build names them."""
    os.chdir(directory)
    tally = CorpusTally()
    plain = replace(options, near_dup_threshold=None, strict=False)  # datatrove computes its own signatures
    out = _task_file(work / "processed", rank)
    keys = [_task_file(work / "keys" / f"{bucket:05d}", rank).open("w") for bucket in range(world_size)]
    with out.open("w", encoding="utf-8") as sink:
        for unit in range(rank, len(spans), world_size):
            position = 0
            for item in read_span(spans[unit], options.text_field, options.html, options.max_document_bytes):
                if isinstance(item, SourceProblem):
                    tally.problem(item)
                    continue
                document = process_document(item, plain)
                if tally.read(document.input_bytes, document.cleaned, document.rejected_by):
                    record = {
                        "order": [unit, position],
                        "id": document.id,
                        "source": document.source,
                        "text": document.text,
                        "exact": document.exact,
                        "pii": dict(document.pii),
                    }
                    sink.write(json.dumps(record, ensure_ascii=False) + "\n")
                    bucket = _key_bucket(document.exact, world_size)  # what stage 2's task `bucket` reads
                    keys[bucket].write(json.dumps([document.exact, record["order"]]) + "\n")
                position += 1
    for handle in keys:
        handle.close()
    _write_tally(work, f"process-{rank:05d}", tally)
    yield from ()


def find_exact_duplicates(data, rank: int, world_size: int, work: Path) -> Iterator:
    """Stage 2: for the exact keys that hash to this task (written by every stage-1 task into this task's
    bucket), every document but the first in global order."""
    first: dict[str, list[int]] = {}
    duplicates: list[list[int]] = []
    for path in sorted((work / "keys" / f"{rank:05d}").glob("*.jsonl")):
        for key, order in _records(path):
            seen = first.get(key)
            if seen is None:
                first[key] = order
            else:
                duplicates.append(max(seen, order))
                first[key] = min(seen, order)
    by_owner: dict[int, list[list[int]]] = {}
    for order in duplicates:  # filed under the stage-1 task that read the span, which reads them back
        by_owner.setdefault(order[0] % world_size, []).append(order)
    for owner in range(world_size):
        _task_file(work / "exact" / f"{owner:05d}", rank).write_text(json.dumps(by_owner.get(owner, [])))
    _write_tally(work, f"exact-{rank:05d}", CorpusTally(exact_duplicates=len(duplicates)))
    yield from ()


def read_kept(data, rank: int, world_size: int, work: Path, exact: bool) -> Iterator:
    """This task's processed documents without the exact duplicates, as datatrove documents in order."""
    dropped: set[tuple[int, int]] = set()
    if exact:
        for path in (work / "exact" / f"{rank:05d}").glob("*.jsonl"):
            dropped.update(tuple(order) for order in json.loads(path.read_text()))
    for record in _records(_task_file(work / "processed", rank)):
        if tuple(record["order"]) not in dropped:
            yield EngineDocument(
                text=record["text"], id=json.dumps(record["order"]), metadata={"record": record}
            )


def write_survivors(data, rank: int, world_size: int, work: Path) -> Iterator:
    """The documents that survived deduplication, in this task's order."""
    with _task_file(work / "survivors", rank).open("w", encoding="utf-8") as sink:
        for document in data:
            sink.write(json.dumps(document.metadata["record"], ensure_ascii=False) + "\n")
    yield from ()


class WhitespaceWords(WordTokenizer):
    """Words for datatrove's MinHash shingles: its own text normalisation, then whitespace. Its default
    tokenizers are language models (NLTK, spaCy) that this build neither needs nor can download offline."""

    def word_tokenize(self, text: str) -> list[str]:
        return text.split()

    def sent_tokenize(self, text: str) -> list[str]:
        return text.splitlines()

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        spans, start = [], 0
        for line in text.splitlines(keepends=True):
            spans.append((start, start + len(line)))
            start += len(line)
        return spans


def _records(path: Path) -> Iterator[dict]:
    if not path.is_file():
        return
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            yield json.loads(line)


def _order(record: dict) -> list[int]:
    return record["order"]


def _key_bucket(key: str, buckets: int) -> int:
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % buckets


def _task_file(directory: Path, rank: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    return directory / f"{rank:05d}.jsonl"


def _write_tally(work: Path, name: str, tally: CorpusTally) -> None:
    directory = work / "tallies"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.json").write_text(json.dumps(tally.to_json()))
