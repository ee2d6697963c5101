"""The training data loader: batches fixed by (seed, step, rank), exact over restarts and across ranks."""

from __future__ import annotations

import numpy as np
import torch

from llmctl.data.loader import TokenFile, WindowSampler, validation_batches


def global_batch(sampler: WindowSampler, step: int, world: int, micro: int) -> list[torch.Tensor]:
    accum = sampler.global_batch_size // (world * micro)
    return [
        sampler.micro_batch(step, a, rank, world, micro)[0] for rank in range(world) for a in range(accum)
    ]


def test_batches_are_identical_across_a_restart(sample_pipeline):
    tokens = TokenFile(sample_pipeline["tokens"], "train")
    first = WindowSampler(tokens, 64, 8, seed=5)
    expected = [first.micro_batch(step, 0, 0, 1, 8) for step in range(3, 6)]
    restarted = WindowSampler(TokenFile(sample_pipeline["tokens"], "train"), 64, 8, seed=5)
    for step, (x, y) in zip(range(3, 6), expected, strict=True):
        rx, ry = restarted.micro_batch(step, 0, 0, 1, 8)
        assert torch.equal(rx, x) and torch.equal(ry, y)
    other_seed = WindowSampler(tokens, 64, 8, seed=6).micro_batch(3, 0, 0, 1, 8)[0]
    assert not torch.equal(other_seed, expected[0][0])


def test_targets_are_inputs_shifted_by_one(sample_pipeline):
    tokens = TokenFile(sample_pipeline["tokens"], "train")
    x, y = WindowSampler(tokens, 32, 4, seed=0).micro_batch(0, 0, 0, 1, 4)
    assert x.shape == y.shape == (4, 32) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_two_ranks_cover_the_single_process_batch_disjointly(sample_pipeline):
    tokens = TokenFile(sample_pipeline["tokens"], "train")
    sampler = WindowSampler(tokens, 64, 16, seed=1)
    for step in (0, 7):
        single = {tuple(row.tolist()) for batch in global_batch(sampler, step, 1, 4) for row in batch}
        rank_rows = [
            [tuple(row.tolist()) for a in range(2) for row in sampler.micro_batch(step, a, rank, 2, 4)[0]]
            for rank in range(2)
        ]
        assert len(single) == 16
        assert not set(rank_rows[0]) & set(rank_rows[1])
        assert set(rank_rows[0]) | set(rank_rows[1]) == single


def test_one_epoch_visits_every_window_exactly_once(sample_pipeline):
    tokens = TokenFile(sample_pipeline["tokens"], "train")
    sampler = WindowSampler(tokens, 256, 4, seed=2)
    starts = sampler.sample_starts(np.arange(sampler.windows_per_epoch))
    assert sorted(starts.tolist()) == [i * 256 for i in range(sampler.windows_per_epoch)]
    next_epoch = sampler.sample_starts(np.arange(sampler.windows_per_epoch, 2 * sampler.windows_per_epoch))
    assert set((next_epoch % 256).tolist()) == {int(next_epoch[0] % 256)}  # one shifted boundary per epoch
    assert max(next_epoch) + 257 <= len(tokens)


def test_validation_batches_are_fixed_and_split_over_ranks(sample_pipeline):
    tokens = TokenFile(sample_pipeline["tokens"], "val")
    whole = validation_batches(tokens, 32, 4, 3)
    assert sum(len(x) for x, _ in whole) == 12
    halves = [validation_batches(tokens, 32, 4, 3, rank=r, world_size=2) for r in range(2)]
    rows = sorted(tuple(row.tolist()) for half in halves for x, _ in half for row in x)
    assert rows == sorted(tuple(row.tolist()) for x, _ in whole for row in x)
