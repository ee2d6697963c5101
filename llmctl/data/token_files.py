"""`tokenize encode`: corpus JSONL -> flat, memory-mappable token files plus meta.json: one file per split, or
with `per_shard` one per corpus shard (train-00000.bin, ...) listed in order in meta.json's `shards`, which
the loader reads as one stream identical to the single file."""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from llmctl.atomic import atomic_directory, check_output
from llmctl.data.corpus import MANIFEST, SPLITS, iter_texts, iter_texts_of, read_manifest, split_files
from llmctl.data.tokenizer import open_tokenizer
from llmctl.data.tokenizer_base import Tokenizer
from llmctl.errors import UserError

# writes every split's token files, one per corpus shard, into a directory (datatrove's tasks do, in
# llmctl.data.datatrove_stages): (corpus, tokenizer file, directory, threads=) -> each split's shard entries
ShardWriter = Callable[..., dict[str, list[dict]]]

META_FILE = "meta.json"
FORMAT_VERSION = 1
REQUIRED_META = {
    "dtype",
    "tokens",
    "vocab_size",
    "bos_id",
    "eos_id",
    "pad_id",
    "tokenizer_sha256",
    "fingerprint",
}
BATCH_BYTES = 8 << 20


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


def input_fingerprint(corpus: Path, tokenizer: Tokenizer, per_shard: bool = False) -> str:
    """Identifies (corpus content, tokenizer, format, layout): equal fingerprints mean the token files are up to
    date. The layout does not change the token stream, so it is not part of what training checks (`stream`)."""
    digest = hashlib.sha256()
    digest.update((Path(corpus) / MANIFEST).read_bytes())
    digest.update(tokenizer.sha256().encode())
    digest.update(f"format={FORMAT_VERSION}".encode())
    if per_shard:
        digest.update(b"layout=shards")
    return digest.hexdigest()


def read_meta(tokens_dir: Path) -> dict:
    path = Path(tokens_dir) / META_FILE
    if not path.is_file():
        raise UserError(
            f"not a token directory: {tokens_dir} has no {META_FILE} (run llmctl tokenize encode)"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        meta = None
    if not isinstance(meta, dict) or not meta.keys() >= REQUIRED_META:
        raise UserError(f"{path} is damaged; re-run llmctl tokenize encode --overwrite")
    return meta


def token_stream_fingerprint(meta: dict) -> str:
    """What identifies the token stream training reads, whichever layout holds it."""
    return meta.get("stream", meta["fingerprint"])


def split_token_files(tokens_dir: Path, split: str, meta: dict) -> list[tuple[Path, int]]:
    """A split's token files in stream order, with the tokens each holds."""
    shards = meta.get("shards", {}).get(split)
    if shards is None:
        return [(Path(tokens_dir) / f"{split}.bin", meta["tokens"][split])]
    return [(Path(tokens_dir) / shard["file"], shard["tokens"]) for shard in shards]


def split_file_problem(tokens_dir: Path, split: str, meta: dict) -> str | None:
    """Why a split's token files do not hold what its meta promises (missing, truncated, grown), or None."""
    itemsize = np.dtype(meta["dtype"]).itemsize
    for path, tokens in split_token_files(tokens_dir, split, meta):
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != tokens * itemsize:
            return (
                f"{path} has {path.stat().st_size:,} bytes where {META_FILE} promises {tokens * itemsize:,}"
            )
    return None


def encode_corpus(
    corpus: Path,
    tokenizer_path: Path,
    out: Path,
    threads: int = 0,
    on_progress: Callable[[int], None] | None = None,
    overwrite: bool = False,
    per_shard: bool = False,
    shard_writer: ShardWriter | None = None,
) -> dict:
    """Encode every split; a no-op returning the existing meta when inputs are unchanged. `per_shard` writes
    one token file per corpus shard (what many encoders can write side by side) instead of one per split;
    a `shard_writer` (datatrove's tasks: llmctl.data.datatrove_stages) writes those files, the same bytes."""
    if shard_writer is not None and not per_shard:
        raise UserError("tokenize encode --executor writes one token file per shard: add --per-shard")
    corpus, out = Path(corpus), Path(out)
    read_manifest(corpus)
    tokenizer = open_tokenizer(tokenizer_path)
    fingerprint = input_fingerprint(corpus, tokenizer, per_shard)
    if (out / META_FILE).is_file():
        existing = json.loads((out / META_FILE).read_text())
        intact = not any(split_file_problem(out, split, existing) for split in SPLITS)
        if existing.get("fingerprint") == fingerprint and intact:
            return {**existing, "up_to_date": True}
    check_output(out, [corpus, tokenizer_path], overwrite)
    encoder = TokenEncoder(tokenizer, token_dtype(tokenizer.vocab_size), threads, on_progress)
    started = time.perf_counter()
    tokens: dict[str, int] = {}
    documents: dict[str, int] = {}
    shards: dict[str, list[dict]] = {}
    with atomic_directory(out) as staging:
        if shard_writer is not None:
            shards = shard_writer(corpus, Path(tokenizer_path), staging, threads=threads)
        elif per_shard:
            shards = {
                split: [encode_shard(encoder, source, staging) for source in split_files(corpus, split)]
                for split in SPLITS
            }
        for split in SPLITS:
            if per_shard:
                tokens[split] = sum(entry["tokens"] for entry in shards[split])
                documents[split] = sum(entry["documents"] for entry in shards[split])
            else:
                tokens[split], documents[split] = encoder.encode(
                    iter_texts(corpus, split), staging / f"{split}.bin"
                )
        text_bytes = (
            sum(entry["text_bytes"] for entries in shards.values() for entry in entries)
            if per_shard
            else encoder.text_bytes
        )
        seconds = time.perf_counter() - started
        meta = {
            "format_version": FORMAT_VERSION,
            "dtype": encoder.dtype.name,
            "vocab_size": tokenizer.vocab_size,
            "bos_id": tokenizer.bos_id,
            "eos_id": tokenizer.eos_id,
            "pad_id": tokenizer.pad_id,
            "tokens": tokens,
            "documents": documents,
            **({"shards": shards} if per_shard else {}),
            "text_bytes": text_bytes,
            "tokenizer": str(tokenizer.path),
            "tokenizer_sha256": tokenizer.sha256(),
            "corpus": str(corpus),
            "fingerprint": fingerprint,
            "stream": input_fingerprint(corpus, tokenizer),
            "seconds": round(seconds, 3),
            "mb_per_second": round(text_bytes / 1e6 / max(seconds, 1e-9), 3),
        }
        (staging / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return {**meta, "up_to_date": False}


def encode_shard(encoder: TokenEncoder, source: Path, directory: Path) -> dict:
    """One corpus shard -> its token file in `directory` (train-00003.jsonl -> train-00003.bin); its meta.json
    entry."""
    name = source.with_suffix(".bin").name
    before = encoder.text_bytes
    count, texts = encoder.encode(iter_texts_of(source), directory / name)
    return {
        "file": name,
        "tokens": count,
        "documents": texts,
        "text_bytes": encoder.text_bytes - before,
        "source": source.name,
    }


class TokenEncoder:
    """Texts -> one token file, each document followed by eos; counts what it wrote."""

    def __init__(
        self, tokenizer: Tokenizer, dtype: np.dtype, threads: int, on_progress: Callable[[int], None] | None
    ) -> None:
        self.tokenizer, self.dtype, self.threads, self.on_progress = tokenizer, dtype, threads, on_progress
        self.text_bytes = 0

    def encode(self, texts: Iterator[str], path: Path) -> tuple[int, int]:
        """(tokens, documents) written to `path`."""
        tokens = documents = 0
        with path.open("wb") as sink:
            for batch in _text_batches(texts):
                encoded = self.tokenizer.encode_batch(batch, self.threads)
                for ids in encoded:
                    ids.append(self.tokenizer.eos_id)  # documents are separated by eos
                count = sum(len(ids) for ids in encoded)
                sink.write(
                    np.fromiter(
                        itertools.chain.from_iterable(encoded), dtype=self.dtype, count=count
                    ).tobytes()
                )
                tokens += count
                documents += len(batch)
                size = sum(len(text.encode()) for text in batch)
                self.text_bytes += size
                if self.on_progress is not None:
                    self.on_progress(size)
        return tokens, documents


def _text_batches(texts: Iterator[str]) -> Iterator[list[str]]:
    batch, size = [], 0
    for text in texts:
        batch.append(text)
        size += len(text)
        if size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch
