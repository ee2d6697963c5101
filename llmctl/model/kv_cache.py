"""A preallocated key/value cache: decoding writes in place instead of concatenating every step."""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every layer for up to `max_len` positions of a batch.

    All sequences of the batch share one write position (`length`); prompts of different lengths are
    left-padded by the caller, who passes an attention mask over the cached positions.
    """

    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        n_kv_head: int,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (batch_size, n_kv_head, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.max_len = max_len
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

    def reset(self) -> None:
        self.length = 0
