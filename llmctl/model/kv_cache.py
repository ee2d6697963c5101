"""A preallocated key/value cache: decoding writes in place instead of concatenating every step."""

from __future__ import annotations

import torch

from llmctl.model.config import ModelConfig


def layer_buffers(
    config: ModelConfig, rows: int, max_len: int, dtype: torch.dtype, device: torch.device | str
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Zeroed keys and values for every layer, each (rows, n_kv_head, max_len, head_dim)."""
    shape = (rows, config.kv_heads, max_len, config.head_dim)
    keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
    values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
    return keys, values


class KVCache:
    """Keys and values of every layer for up to `max_len` positions of a batch.

    All sequences of the batch share one write position (`length`); prompts of different lengths are
    left-padded by the caller, who passes an attention mask over the cached positions.
    """

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], max_len: int) -> None:
        self.keys, self.values, self.max_len = keys, values, max_len
        self.length = 0

    def update(
        self, layer: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new positions of one layer; return that layer's keys and values so far."""
        start, end = self.length, self.length + keys.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {end} were requested")
        self.keys[layer][:, :, start:end] = keys
        self.values[layer][:, :, start:end] = values
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, n_tokens: int) -> None:
        """Called once per forward pass, after every layer has written its new positions."""
        self.length += n_tokens

    def reorder(self, batch_indices: torch.Tensor) -> None:
        """Reorder the batch dimension (beam search keeps the surviving beams' histories)."""
        for layer in range(len(self.keys)):
            self.keys[layer] = self.keys[layer].index_select(0, batch_indices)
            self.values[layer] = self.values[layer].index_select(0, batch_indices)


class SlotKVCache:
    """Per-row positions for continuous batching: each slot holds one request at its own length.

    Active requests occupy the first slots; a finished request's slot is refilled by moving the last
    active one into it, so a decode step always runs on a contiguous prefix of rows without copying.
    Prefill goes through `row(slot)`, a one-row KVCache over the same storage; decode steps through
    `rows(batch)`.
    """

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], max_len: int) -> None:
        self.keys, self.values, self.max_len = keys, values, max_len
        self.lengths = torch.zeros(keys[0].shape[0], dtype=torch.long, device=keys[0].device)

    def row(self, slot: int) -> KVCache:
        """A one-row KVCache over this slot's storage, starting empty (prefill writes through it)."""
        return self.rows_from(slot, 1)

    def rows_from(self, first: int, count: int) -> KVCache:
        """A KVCache over slots first..first+count-1, starting empty: prompts prefilled together."""
        rows = slice(first, first + count)
        return KVCache([k[rows] for k in self.keys], [v[rows] for v in self.values], self.max_len)

    def rows(self, batch: int, width: int = 1) -> DecodeRows:
        """The first `batch` slots for one decode step of `width` new tokens per row (more than one when a
        draft's proposals are verified), attending over the longest row's positions."""
        span = int(self.lengths[:batch].max()) + width
        if span > self.max_len:
            raise ValueError(f"a request reached the cache's {self.max_len} positions")
        return DecodeRows(self.keys, self.values, self.lengths[:batch], span)

    def move(self, source: int, target: int) -> None:
        length = int(self.lengths[source])
        for buffers in (self.keys, self.values):
            for layer in buffers:
                layer[target, :, :length] = layer[source, :, :length]
        self.lengths[target] = length


class DecodeRows:
    """One decode step of the first rows of a `SlotKVCache`: the same number of new tokens per row, each row at
    its own position, attending over the first `span` cached positions. Built from tensors and one int, so that
    a compiled decode step (llmctl.infer.decode) takes the step's rows and span as inputs, not as constants."""

    def __init__(
        self, keys: list[torch.Tensor], values: list[torch.Tensor], positions: torch.Tensor, span: int
    ) -> None:
        self.keys, self.values, self.positions, self.span = keys, values, positions, span

    def positions_and_mask(self, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Position ids (batch, width) and the keys each new token may see, (batch, 1, width, span): its row's
        cached positions and the new tokens up to itself."""
        positions = self.positions[:, None] + torch.arange(width, device=self.positions.device)
        keys = torch.arange(self.span, device=self.positions.device)
        return positions, (keys <= positions[:, :, None])[:, None]

    def update(
        self, layer: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch, width = keys.shape[0], keys.shape[2]
        rows = torch.arange(batch, device=keys.device)[:, None]
        positions = self.positions[:, None] + torch.arange(width, device=keys.device)  # (batch, width)
        self.keys[layer][rows, :, positions] = keys.transpose(1, 2)  # indexed as (batch, width, heads, dim)
        self.values[layer][rows, :, positions] = values.transpose(1, 2)
        return self.keys[layer][:batch, :, : self.span], self.values[layer][:batch, :, : self.span]

    def advance(self, n_tokens: int) -> None:
        self.positions += n_tokens  # a view of the slot cache's lengths
