"""`tokenize encode`: corpus JSONL -> one flat, memory-mappable token file per split, plus meta.json."""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from llmctl.atomic import atomic_directory, check_output
from llmctl.data.corpus import MANIFEST, SPLITS, iter_texts, read_manifest
from llmctl.data.tokenizer import Tokenizer, open_tokenizer
from llmctl.errors import UserError

META_FILE = "meta.json"
FORMAT_VERSION = 1
REQUIRED_META = {"dtype", "tokens", "vocab_size", "bos_id", "eos_id", "pad_id", "tokenizer_sha256", "fingerprint"}
BATCH_BYTES = 8 << 20


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


def input_fingerprint(corpus: Path, tokenizer: Tokenizer) -> str:
    """Identifies (corpus content, tokenizer, format): equal fingerprints mean the token files are up to date."""
    digest = hashlib.sha256()
    digest.update((Path(corpus) / MANIFEST).read_bytes())
    digest.update(tokenizer.sha256().encode())
    digest.update(f"format={FORMAT_VERSION}".encode())
    return digest.hexdigest()


def read_meta(tokens_dir: Path) -> dict:
    path = Path(tokens_dir) / META_FILE
    if not path.is_file():
        raise UserError(f"not a token directory: {tokens_dir} has no {META_FILE} (run llmctl tokenize encode)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        meta = None
    if not isinstance(meta, dict) or not REQUIRED_META <= meta.keys():
        raise UserError(f"{path} is damaged; re-run llmctl tokenize encode --overwrite")
    return meta


def split_file_problem(tokens_dir: Path, split: str, meta: dict) -> str | None:
    """Why a split's token file does not hold what its meta promises (missing, truncated, grown), or None."""
    path = Path(tokens_dir) / f"{split}.bin"
    if not path.is_file():
        return f"{path} is missing"
    expected = meta["tokens"][split] * np.dtype(meta["dtype"]).itemsize
    if path.stat().st_size != expected:
        return f"{path} has {path.stat().st_size:,} bytes where {META_FILE} promises {expected:,}"
    return None


def encode_corpus(
    corpus: Path,
    tokenizer_path: Path,
    out: Path,
    threads: int = 0,
    on_progress: Callable[[int], None] | None = None,
    overwrite: bool = False,
) -> dict:
    """Encode every split; a no-op returning the existing meta when inputs are unchanged."""
    corpus, out = Path(corpus), Path(out)
    read_manifest(corpus)
    tokenizer = open_tokenizer(tokenizer_path)
    fingerprint = input_fingerprint(corpus, tokenizer)
    if (out / META_FILE).is_file():
        existing = json.loads((out / META_FILE).read_text())
        intact = not any(split_file_problem(out, split, existing) for split in SPLITS)
        if existing.get("fingerprint") == fingerprint and intact:
            return {**existing, "up_to_date": True}
    check_output(out, [corpus, tokenizer_path], overwrite)
    dtype = token_dtype(tokenizer.vocab_size)
    started = time.perf_counter()
    tokens: dict[str, int] = {}
    documents: dict[str, int] = {}
    text_bytes = 0
    with atomic_directory(out) as staging:
        for split in SPLITS:
            tokens[split] = documents[split] = 0
            with (staging / f"{split}.bin").open("wb") as sink:
                for texts in _text_batches(iter_texts(corpus, split)):
                    encoded = tokenizer.encode_batch(texts, threads)
                    for ids in encoded:
                        ids.append(tokenizer.eos_id)  # documents are separated by eos
                    count = sum(len(ids) for ids in encoded)
                    array = np.fromiter(itertools.chain.from_iterable(encoded), dtype=dtype, count=count)
                    sink.write(array.tobytes())
                    tokens[split] += count
                    documents[split] += len(texts)
                    size = sum(len(text.encode()) for text in texts)
                    text_bytes += size
                    if on_progress is not None:
                        on_progress(size)
        seconds = time.perf_counter() - started
        meta = {
            "format_version": FORMAT_VERSION,
            "dtype": dtype.name,
            "vocab_size": tokenizer.vocab_size,
            "bos_id": tokenizer.bos_id,
            "eos_id": tokenizer.eos_id,
            "pad_id": tokenizer.pad_id,
            "tokens": tokens,
            "documents": documents,
            "text_bytes": text_bytes,
            "tokenizer": str(tokenizer.path),
            "tokenizer_sha256": tokenizer.sha256(),
            "corpus": str(corpus),
            "fingerprint": fingerprint,
            "seconds": round(seconds, 3),
            "mb_per_second": round(text_bytes / 1e6 / max(seconds, 1e-9), 3),
        }
        (staging / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return {**meta, "up_to_date": False}


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
