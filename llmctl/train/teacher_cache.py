"""Offline distillation: the teacher's top-k next-token logits for every position of the training split,
computed once into files aligned with the token stream, so that training never runs the teacher.

Row p holds the k largest logits (fp16) and their token ids of the teacher's prediction after stream token
p, and the log of its normaliser at the distillation temperature (fp32), computed over the consecutive
windows the first epoch trains on (starts 0, L, 2L, ...), so the first epoch sees exactly what the online
teacher would give. Later epochs shift their windows by up to L - 1
tokens: a position's cached distribution then comes from its first-epoch window's context (with document
masking, this differs only for a window's first document). Under torchrun every rank computes every
world_size-th window into the same files, which must therefore sit on a file system all ranks share.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from llmctl.data.loader import TokenFile
from llmctl.errors import UserError
from llmctl.model import Transformer
from llmctl.model.transformer import document_ids_of
from llmctl.train.distributed import DistributedContext

META_FILE = "meta.json"
VALUES_FILE = "values.f16"
INDICES_FILE = "indices.bin"
NORMALIZER_FILE = "normalizer.f32"
WINDOWS_PER_BATCH = 8


@dataclass(frozen=True)
class CacheKey:
    """What the cached logits depend on: a cache built for another key is refused, never silently used."""

    teacher_sha256: str
    tokens_fingerprint: str
    seq_len: int
    top_k: int
    temperature: float
    document_masking: bool


def _index_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.int32)


class TeacherCache:
    """The cached rows of a training split, memory-mapped: `windows(starts)` gives what the teacher would
    have said for the training windows beginning at `starts`."""

    def __init__(self, directory: Path, key: CacheKey) -> None:
        self.directory = Path(directory)
        try:
            self.meta = json.loads((self.directory / META_FILE).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise UserError(
                f"distill.teacher_cache {self.directory} is not a teacher cache ({error}); remove it and run again"
            ) from None
        stale = [name for name, value in asdict(key).items() if self.meta.get(name) != value]
        if stale:
            raise UserError(
                f"distill.teacher_cache {self.directory} was built for another {', '.join(stale)}; "
                "remove it (it is rebuilt on the next run) or point distill.teacher_cache elsewhere"
            )
        rows, top_k = self.meta["rows"], key.top_k
        self.values = np.memmap(self.directory / VALUES_FILE, np.float16, "r", shape=(rows, top_k))
        self.indices = np.memmap(
            self.directory / INDICES_FILE, np.dtype(self.meta["index_dtype"]), "r", shape=(rows, top_k)
        )
        self.normalizer = np.memmap(self.directory / NORMALIZER_FILE, np.float32, "r", shape=(rows,))

    def windows(self, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top-k logits (B, seq_len, k) float16, their ids (B, seq_len, k) int64, and the log normaliser at
        the temperature (B, seq_len) float32."""
        rows = np.asarray(starts, dtype=np.int64)[:, None] + np.arange(seq_len)
        values = torch.from_numpy(np.ascontiguousarray(self.values[rows]))
        indices = torch.from_numpy(self.indices[rows].astype(np.int64))
        return values, indices, torch.from_numpy(np.ascontiguousarray(self.normalizer[rows]))


def _barrier(context: DistributedContext) -> None:
    if context.is_distributed:
        dist.barrier()


def build_teacher_cache(
    directory: Path,
    teacher: Transformer,
    tokens: TokenFile,
    key: CacheKey,
    eos_id: int,
    context: DistributedContext,
) -> float:
    """Write the cache at `directory` (every rank takes part); the seconds it took. A staging directory
    beside it is renamed into place only when every row is written, so an interrupted build leaves nothing
    that could be mistaken for a cache."""
    started = time.perf_counter()
    directory = Path(directory)
    staging = directory.with_name(f".{directory.name}.partial")
    rows, top_k, seq_len = len(tokens) - 1, key.top_k, key.seq_len
    if top_k > teacher.config.vocab_size:
        raise UserError(f"distill.top_k {top_k} exceeds the teacher's {teacher.config.vocab_size} tokens")
    index_dtype = _index_dtype(teacher.config.vocab_size)
    if context.is_main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        np.memmap(staging / VALUES_FILE, np.float16, "w+", shape=(rows, top_k)).flush()
        np.memmap(staging / INDICES_FILE, index_dtype, "w+", shape=(rows, top_k)).flush()
        np.memmap(staging / NORMALIZER_FILE, np.float32, "w+", shape=(rows,)).flush()
    _barrier(context)
    values = np.memmap(staging / VALUES_FILE, np.float16, "r+", shape=(rows, top_k))
    indices = np.memmap(staging / INDICES_FILE, index_dtype, "r+", shape=(rows, top_k))
    normalizer = np.memmap(staging / NORMALIZER_FILE, np.float32, "r+", shape=(rows,))
    starts = list(range(0, rows, seq_len))[context.rank :: context.world_size]
    with torch.inference_mode():
        for first in range(0, len(starts), WINDOWS_PER_BATCH):
            chunk = starts[first : first + WINDOWS_PER_BATCH]
            lengths = [min(seq_len, rows - start) for start in chunk]
            width = max(lengths)
            batch = np.zeros((len(chunk), width), dtype=np.int64)
            for row, (start, length) in enumerate(zip(chunk, lengths, strict=True)):
                batch[row, :length] = tokens.window(start, length - 1)
            inputs = torch.from_numpy(batch)
            documents = document_ids_of(inputs, eos_id).to(context.device) if key.document_masking else None
            logits = teacher(inputs.to(context.device), document_ids=documents).float()
            top = logits.topk(top_k, dim=-1)
            top_values = top.values.half().cpu().numpy()
            top_indices = top.indices.cpu().numpy().astype(index_dtype)
            log_normalizer = torch.logsumexp(logits / key.temperature, dim=-1).cpu().numpy()
            for row, (start, length) in enumerate(zip(chunk, lengths, strict=True)):
                values[start : start + length] = top_values[row, :length]
                indices[start : start + length] = top_indices[row, :length]
                normalizer[start : start + length] = log_normalizer[row, :length]
    for array in (values, indices, normalizer):
        array.flush()
    del values, indices, normalizer
    _barrier(context)
    if context.is_main:
        meta = {**asdict(key), "rows": rows, "index_dtype": index_dtype.name}
        (staging / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if (
            directory.exists()
        ):  # another run finished one first: never replace it (TeacherCache checks its key)
            shutil.rmtree(staging)
        else:
            staging.rename(directory)
    _barrier(context)
    return time.perf_counter() - started
