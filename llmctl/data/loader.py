"""Training windows from memory-mapped token files, fixed by (seed, step, rank) alone.

Global sample i of the run is window `perm_e[i mod W]` of epoch e = i // W, where each epoch shuffles the
W non-overlapping windows and shifts their boundaries by a seeded offset. Step s owns samples
[s*G, (s+1)*G) of a global batch of G; rank r in micro-step a takes the slice (a*world + r)*micro. So a
resumed run, or any number of ranks, sees exactly the samples one uninterrupted process would.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from llmctl.data.instructions import IGNORE, PackedWindows
from llmctl.data.token_files import read_meta, split_file_problem, split_token_files
from llmctl.errors import UserError


def micro_batch_samples(
    step: int, micro_step: int, rank: int, world_size: int, micro_batch_size: int, global_batch_size: int
) -> np.ndarray:
    """The global sample indices a rank takes in one micro-step of an optimizer step."""
    first = step * global_batch_size + (micro_step * world_size + rank) * micro_batch_size
    return np.arange(first, first + micro_batch_size)


class TokenFile:
    """One split's tokens as one stream, memory-mapped: a single file, or the shard files in the order meta.json
    lists them (a window may span two). Nothing is read until a window is sliced."""

    def __init__(self, tokens_dir: Path, split: str) -> None:
        self.meta = read_meta(tokens_dir)
        problem = split_file_problem(tokens_dir, split, self.meta)
        if problem:
            raise UserError(f"{problem}; re-run llmctl tokenize encode --overwrite")
        dtype = np.dtype(self.meta["dtype"])
        files = [(path, count) for path, count in split_token_files(tokens_dir, split, self.meta) if count]
        self.parts = [np.memmap(path, dtype=dtype, mode="r") for path, _ in files]
        self.ends = np.cumsum([count for _, count in files], dtype=np.int64)  # stream offset after each part

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def window(self, start: int, seq_len: int) -> np.ndarray:
        stop = start + seq_len + 1
        part = int(np.searchsorted(self.ends, start, side="right"))
        pieces = []
        while start < stop and part < len(self.parts):
            offset = int(self.ends[part]) - len(self.parts[part])
            pieces.append(self.parts[part][start - offset : stop - offset])
            start = int(self.ends[part])
            part += 1
        return np.concatenate(pieces).astype(np.int64) if len(pieces) > 1 else np.asarray(pieces[0], np.int64)


class WindowSampler:
    def __init__(self, tokens: TokenFile, seq_len: int, global_batch_size: int, seed: int) -> None:
        self.tokens, self.seq_len, self.global_batch_size, self.seed = (
            tokens,
            seq_len,
            global_batch_size,
            seed,
        )
        self.windows_per_epoch = (len(tokens) - seq_len) // seq_len
        if self.windows_per_epoch < 1:
            raise UserError(
                f"the training split has {len(tokens)} tokens, too few for one window of {seq_len} + 1"
            )
        self._epoch_cache: tuple[int, np.ndarray, int] | None = None

    def _epoch(self, epoch: int) -> tuple[np.ndarray, int]:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(self.windows_per_epoch)
            offset = int(rng.integers(0, self.seq_len)) if epoch else 0
            self._epoch_cache = (epoch, order, offset)
        return self._epoch_cache[1], self._epoch_cache[2]

    def sample_starts(self, sample_indices: np.ndarray) -> np.ndarray:
        starts = np.empty(len(sample_indices), dtype=np.int64)
        for position, index in enumerate(sample_indices):
            epoch, within = divmod(int(index), self.windows_per_epoch)
            order, offset = self._epoch(epoch)
            starts[position] = int(order[within]) * self.seq_len + offset
        return starts

    def micro_batch_starts(
        self, step: int, micro_step: int, rank: int, world_size: int, micro_batch_size: int
    ) -> np.ndarray:
        """Where in the token stream each window of a micro-batch begins."""
        samples = micro_batch_samples(
            step, micro_step, rank, world_size, micro_batch_size, self.global_batch_size
        )
        return self.sample_starts(samples)

    def micro_batch(
        self, step: int, micro_step: int, rank: int, world_size: int, micro_batch_size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each (micro_batch_size, seq_len) int64."""
        starts = self.micro_batch_starts(step, micro_step, rank, world_size, micro_batch_size)
        windows = torch.from_numpy(np.stack([self.tokens.window(int(s), self.seq_len) for s in starts]))
        return windows[:, :-1], windows[:, 1:]


def window_batch(windows: PackedWindows, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs, targets, example of each input position) of packed windows, with IGNORE wherever no loss is
    wanted."""
    ids = torch.from_numpy(windows.ids[rows])
    targets = ids[:, 1:].masked_fill(~torch.from_numpy(windows.loss[rows, 1:]), IGNORE)
    return ids[:, :-1], targets, torch.from_numpy(windows.segments[rows, :-1])


class ExampleSampler:
    """Packed finetuning windows, reshuffled each epoch by (seed, epoch): the same sample indexing as
    `WindowSampler`, so a resumed run or any number of ranks sees exactly the same examples."""

    def __init__(self, windows: PackedWindows, global_batch_size: int, seed: int) -> None:
        self.windows, self.global_batch_size, self.seed = windows, global_batch_size, seed
        self._order: tuple[int, np.ndarray] | None = None

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.windows)))
        return self._order[1]

    def micro_batch(
        self, step: int, micro_step: int, rank: int, world_size: int, micro_batch_size: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        samples = micro_batch_samples(
            step, micro_step, rank, world_size, micro_batch_size, self.global_batch_size
        )
        rows = [self._epoch_order(int(i) // len(self.windows))[int(i) % len(self.windows)] for i in samples]
        return window_batch(self.windows, np.array(rows))


def example_validation_batches(
    windows: PackedWindows, batch_size: int, max_batches: int, rank: int = 0, world_size: int = 1
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The leading held-out windows, split round-robin over ranks like `validation_batches`."""
    total = min(len(windows), batch_size * max_batches)
    total -= total % world_size
    if total < 1:
        raise UserError(f"{len(windows)} held-out windows cannot be split over {world_size} ranks")
    mine = np.arange(rank, total, world_size)
    return [
        window_batch(windows, mine[first : first + batch_size]) for first in range(0, len(mine), batch_size)
    ]


def validation_batches(
    tokens: TokenFile, seq_len: int, batch_size: int, max_batches: int, rank: int = 0, world_size: int = 1
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same leading non-overlapping windows every time, split round-robin over ranks; none when the split
    is too short for one window on each rank (a corpus of a few long documents may hold none out)."""
    total = min((len(tokens) - 1) // seq_len, batch_size * max_batches)
    total -= total % world_size  # every rank runs the same number of forwards (FSDP needs all ranks in each)
    mine = list(range(rank, total, world_size))
    batches = []
    for first in range(0, len(mine), batch_size):
        chunk = mine[first : first + batch_size]
        windows = torch.from_numpy(np.stack([tokens.window(i * seq_len, seq_len) for i in chunk]))
        batches.append((windows[:, :-1], windows[:, 1:]))
    return batches
