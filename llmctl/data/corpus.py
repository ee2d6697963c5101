"""`corpus build`: sources -> cleaned, filtered, PII-scrubbed, deduplicated train/val JSONL shards + manifest."""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llmctl import __version__
from llmctl.atomic import atomic_directory, check_output
from llmctl.data.clean import CleaningRules, clean_text, cleaning_steps
from llmctl.data.compression import DOCUMENT_BYTES
from llmctl.data.dedup import NUM_PERM, NearDuplicateIndex, exact_key, minhash_signature
from llmctl.data.documents import Document, SourceProblem
from llmctl.data.filters import FilterRules, failed_filter
from llmctl.data.jsonl import read_jsonl, string_field
from llmctl.data.pii import scrub_pii
from llmctl.data.sources import expand_sources, read_documents
from llmctl.data.tally import CorpusTally
from llmctl.errors import UserError

MANIFEST = "manifest.json"
SPLITS = ("train", "val")
BATCH_BYTES = 1 << 20


@dataclass
class CorpusOptions:
    filters: FilterRules = field(default_factory=FilterRules)
    cleaning: CleaningRules = field(default_factory=CleaningRules)
    text_field: str = "text"
    html: str = "main"  # main: the page's main content (trafilatura); all: every visible text block
    scrub_pii: bool = False
    exact_dedup: bool = True
    near_dup_threshold: float | None = 0.8  # Jaccard; None turns near-duplicate removal off
    val_fraction: float = 0.05
    seed: int = 0
    strict: bool = False
    workers: int = 0  # 0: one per core
    shard_bytes: int = 256 << 20
    max_document_bytes: int = DOCUMENT_BYTES  # read no further into one document (decompressed, extracted)


@dataclass
class ProcessedDocument:
    id: str
    source: str
    text: str
    rejected_by: str | None
    cleaned: Counter  # characters changed, per cleaning rule
    pii: Counter
    exact: str
    signature: np.ndarray | None
    input_bytes: int


class ShardWriter:
    """JSONL shards `{split}-00000.jsonl`, rolled over at a size limit."""

    def __init__(self, directory: Path, split: str, shard_bytes: int) -> None:
        self.directory, self.split, self.shard_bytes = directory, split, shard_bytes
        self.index, self.size, self.handle = 0, 0, None
        self.documents, self.characters, self.bytes = 0, 0, 0

    def write(self, document: ProcessedDocument) -> None:
        line = json.dumps(
            {"id": document.id, "source": document.source, "text": document.text}, ensure_ascii=False
        )
        data = (line + "\n").encode()
        if self.handle is None or self.size + len(data) > self.shard_bytes and self.size:
            self._roll()
        self.handle.write(data)
        self.size += len(data)
        self.documents += 1
        self.characters += len(document.text)
        self.bytes += len(document.text.encode())

    def _roll(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.index += 1
        self.handle = (self.directory / f"{self.split}-{self.index:05d}.jsonl").open("wb")
        self.size = 0

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
        elif self.documents == 0:
            (self.directory / f"{self.split}-00000.jsonl").touch()


_worker_options: CorpusOptions | None = None


def _init_worker(options: CorpusOptions) -> None:
    global _worker_options
    _worker_options = options


def _process(document: Document) -> ProcessedDocument:
    assert _worker_options is not None
    return process_document(document, _worker_options)


def process_document(document: Document, options: CorpusOptions) -> ProcessedDocument:
    """Clean, filter and (when kept) scrub one document, with its exact key and MinHash signature."""
    text, cleaned = clean_text(document.text, options.cleaning)
    pii: Counter = Counter()
    rejected_by = failed_filter(text, options.filters)
    signature = None
    if rejected_by is None:
        if options.scrub_pii:
            text, pii = scrub_pii(text)
        if options.near_dup_threshold is not None:
            signature = minhash_signature(text, NUM_PERM)
    return ProcessedDocument(
        id=document.id,
        source=document.source,
        text=text,
        rejected_by=rejected_by,
        cleaned=cleaned,
        pii=pii,
        exact=exact_key(text),
        signature=signature,
        input_bytes=len(document.text.encode()),
    )


def _process_batch(batch: list[Document]) -> list[ProcessedDocument]:
    return [_process(document) for document in batch]


def assign_split(key: str, seed: int, val_fraction: float) -> str:
    """By document content, not position: the same document lands in the same split whatever the input order."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return "val" if int.from_bytes(digest[:8], "big") / 2**64 < val_fraction else "train"


def build_corpus(
    sources: list[str],
    out: Path,
    options: CorpusOptions,
    on_progress: Callable[[int], None] | None = None,
    overwrite: bool = False,
) -> dict:
    """Build the corpus at `out` atomically and return its manifest."""
    out = Path(out)
    paths, unsupported = expand_sources(sources)
    check_output(out, [*paths, *(Path(source) for source in sources if Path(source).exists())], overwrite)
    started = time.perf_counter()
    tally = CorpusTally()
    exact_seen: set[str] = set()
    near = NearDuplicateIndex(options.near_dup_threshold) if options.near_dup_threshold is not None else None

    def documents() -> Iterator[Document]:
        for item in itertools.chain(
            unsupported, read_documents(paths, options.text_field, options.html, options.max_document_bytes)
        ):
            if isinstance(item, SourceProblem):
                skip_problem(item, tally, options.strict)
                continue
            yield item

    with atomic_directory(out) as staging:
        writers = {split: ShardWriter(staging, split, options.shard_bytes) for split in SPLITS}
        with WorkerPool(options) as run:
            for document in run(_batches(documents())):
                if on_progress is not None:
                    on_progress(document.input_bytes)
                if not tally.read(document.input_bytes, document.cleaned, document.rejected_by):
                    continue
                if options.exact_dedup and document.exact in exact_seen:
                    tally.exact_duplicates += 1
                    continue
                exact_seen.add(document.exact)
                if near is not None and near.is_duplicate_then_add(document.exact, document.signature):
                    tally.near_duplicates += 1
                    continue
                tally.kept(document.source, document.pii)
                writers[assign_split(document.exact, options.seed, options.val_fraction)].write(document)
        manifest = finish_corpus(staging, writers, tally, paths, options, time.perf_counter() - started)
    return manifest


def skip_problem(item: SourceProblem, tally: CorpusTally, strict: bool) -> None:
    if strict:
        raise UserError(f"{item.location}: {item.reason} (without --strict such inputs are skipped)")
    tally.problem(item)


def finish_corpus(
    staging: Path,
    writers: dict[str, ShardWriter],
    tally: CorpusTally,
    paths: list[Path],
    options: CorpusOptions,
    seconds: float,
    engine: dict | None = None,
) -> dict:
    """Close the shards and write the manifest; refused (nothing written) when no document was kept."""
    for writer in writers.values():
        writer.close()
    if not any(writer.documents for writer in writers.values()):
        rules = ", ".join(f"{rule} {count}" for rule, count in tally.filtered.items())
        raise UserError(
            f"no documents kept: {tally.documents_read} read, {tally.filtered.total()} filtered"
            f"{f' ({rules})' if rules else ''}, {tally.exact_duplicates + tally.near_duplicates} "
            f"duplicates, {tally.skipped_inputs} inputs skipped{_first_reason(tally.problems)}; "
            "nothing was written"
        )
    manifest = {
        "llmctl_version": __version__,
        "sources": [str(path) for path in paths],
        "documents_read": tally.documents_read,
        "input_bytes": tally.input_bytes,
        "skipped_inputs": tally.skipped_inputs,
        "problems": tally.problems,
        "filtered": dict(tally.filtered),
        "exact_duplicates": tally.exact_duplicates,
        "near_duplicates": tally.near_duplicates,
        "characters_cleaned": {name: tally.cleaned[name] for name, _ in cleaning_steps(options.cleaning)},
        "pii_replaced": dict(tally.pii),
        "top_sources": dict(tally.per_source.most_common(20)),
        "splits": {
            split: {
                "documents": writer.documents,
                "characters": writer.characters,
                "bytes": writer.bytes,
                "shards": writer.index + 1,
            }
            for split, writer in writers.items()
        },
        "options": {
            "filters": options.filters.model_dump(),
            "cleaning": options.cleaning.model_dump(),
            "text_field": options.text_field,
            "html": options.html,
            "scrub_pii": options.scrub_pii,
            "exact_dedup": options.exact_dedup,
            "near_dup_threshold": options.near_dup_threshold,
            "minhash_num_perm": NUM_PERM,
            "val_fraction": options.val_fraction,
            "seed": options.seed,
            "max_document_bytes": options.max_document_bytes,
        },
        **({"engine": engine} if engine else {}),
        "seconds": round(seconds, 3),
        "mb_per_second": round(tally.input_bytes / 1e6 / max(seconds, 1e-9), 3),
    }
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _first_reason(problems: list[dict]) -> str:
    return f" (e.g. {problems[0]['location']}: {problems[0]['reason']})" if problems else ""


def _batches(documents: Iterable[Document]) -> Iterator[list[Document]]:
    batch, size = [], 0
    for document in documents:
        batch.append(document)
        size += len(document.text)
        if size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


class WorkerPool:
    """Ordered parallel map over document batches; one process per core, or in-process for one worker."""

    def __init__(self, options: CorpusOptions) -> None:
        self.options = options
        self.workers = options.workers or os.cpu_count() or 1
        self.pool = None

    def __enter__(self) -> Callable[[Iterable[list[Document]]], Iterator[ProcessedDocument]]:
        if self.workers > 1:
            # Workers start from a fork server, not from this process: a process with threads (torch's,
            # a test runner's) can fork a child that waits forever on a lock another thread held at the fork,
            # which hung a build once in CI. It costs ~0.5 s a build.
            self.pool = multiprocessing.get_context("forkserver").Pool(
                self.workers, initializer=_init_worker, initargs=(self.options,)
            )
        else:
            _init_worker(self.options)
        return self.run

    def run(self, batches: Iterable[list[Document]]) -> Iterator[ProcessedDocument]:
        results = self.pool.imap(_process_batch, batches) if self.pool else map(_process_batch, batches)
        for batch in results:
            yield from batch

    def __exit__(self, *exc_info) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


def read_manifest(corpus: Path) -> dict:
    path = Path(corpus) / MANIFEST
    if not path.is_file():
        raise UserError(
            f"not a corpus directory: {corpus} has no {MANIFEST} (build one with llmctl corpus build)"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path} is damaged ({error}); rebuild the corpus with llmctl corpus build") from None
    if not isinstance(manifest, dict):
        raise UserError(f"{path} is not a corpus manifest; rebuild the corpus with llmctl corpus build")
    return manifest


def split_files(corpus: Path, split: str) -> list[Path]:
    read_manifest(corpus)
    return sorted(Path(corpus).glob(f"{split}-*.jsonl"))


def iter_texts(corpus: Path, split: str) -> Iterator[str]:
    for path in split_files(corpus, split):
        yield from iter_texts_of(path)


def iter_texts_of(shard: Path) -> Iterator[str]:
    """The texts of one corpus shard file, in order."""
    for location, record in read_jsonl(shard):
        yield string_field(location, record, "text")
