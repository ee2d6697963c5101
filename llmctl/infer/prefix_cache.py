"""Reused prefixes: the keys and values of recently admitted prompts and served sequences, so that a new prompt that begins the
same way (a shared system prompt, the earlier turns of a chat) starts from them instead of prefilling them
again. Least recently used entries go first once the cache holds more than its token budget."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from llmctl.model.kv_cache import SlotKVCache


@dataclass
class PrefixEntry:
    tokens: tuple[int, ...]
    keys: list[torch.Tensor]  # per layer, (n_kv_head, len(tokens), head_dim)
    values: list[torch.Tensor]


@dataclass
class PrefixStats:
    queries: int = 0
    hits: int = 0
    reused_tokens: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


def common_length(a: tuple[int, ...], b: list[int]) -> int:
    """How many leading tokens two sequences share."""
    length = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        length += 1
    return length


class PrefixCache:
    """Bounded by `max_tokens` cached positions in all; a prefix shorter than `min_tokens` is not worth a
    lookup's copy."""

    def __init__(self, max_tokens: int, min_tokens: int = 8) -> None:
        self.max_tokens, self.min_tokens = max_tokens, min_tokens
        self.entries: OrderedDict[tuple[int, ...], PrefixEntry] = OrderedDict()
        self.tokens = 0
        self.stats = PrefixStats()

    def lookup(self, prompt: list[int]) -> tuple[PrefixEntry | None, int]:
        """The entry sharing the longest prefix with `prompt` and how many tokens of it to reuse: at most
        len(prompt) - 1, since the last prompt token must go through the model for the next-token logits."""
        self.stats.queries += 1
        best, length = None, 0
        for entry in self.entries.values():
            shared = min(common_length(entry.tokens, prompt), len(prompt) - 1)
            if shared > length:
                best, length = entry, shared
        if best is None or length < self.min_tokens:
            return None, 0
        self.entries.move_to_end(best.tokens)
        self.stats.hits += 1
        self.stats.reused_tokens += length
        return best, length

    def store(self, tokens: list[int], cache: SlotKVCache, slot: int) -> None:
        """Keep the first len(tokens) cached positions of `slot` (a copy) under `tokens`; an entry that this
        one extends (the prompt stored at admission, now with its reply) is dropped: this one serves it."""
        key = tuple(tokens)
        if len(key) < self.min_tokens or len(key) > self.max_tokens or key in self.entries:
            return
        length = len(key)
        for extended in [entry for entry in self.entries if key[: len(entry)] == entry]:
            del self.entries[extended]
            self.tokens -= len(extended)
        keys = [layer[slot, :, :length].clone() for layer in cache.keys]
        values = [layer[slot, :, :length].clone() for layer in cache.values]
        self.entries[key] = PrefixEntry(key, keys, values)
        self.tokens += length
        while self.tokens > self.max_tokens:
            _, evicted = self.entries.popitem(last=False)
            self.tokens -= len(evicted.tokens)

    @staticmethod
    def restore(entry: PrefixEntry, length: int, cache: SlotKVCache, slot: int) -> None:
        """Copy the entry's first `length` positions into `slot`."""
        for layer, (keys, values) in enumerate(zip(entry.keys, entry.values, strict=True)):
            cache.keys[layer][slot, :, :length] = keys[:, :length]
            cache.values[layer][slot, :, :length] = values[:, :length]
