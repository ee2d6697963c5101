"""`corpus plan`: what a token budget needs in raw text, build and encode hours and disk, from rates measured
by a corpus build and an encode on this machine (their manifest.json and meta.json), not from guesses."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llmctl.data.corpus import read_manifest, split_files
from llmctl.data.token_files import read_meta, token_dtype
from llmctl.errors import UserError


@dataclass(frozen=True)
class CorpusPlan:
    tokens: float
    nodes: int
    bytes_per_token: float  # kept text per token, measured by the encode
    kept_share: float  # kept text / raw input bytes, measured by the build
    corpus_overhead: float  # corpus JSONL bytes / kept text bytes (JSON quoting and fields)
    build_mb_per_second: float
    encode_mb_per_second: float
    token_bytes: int  # per token on disk (uint16 below 65,536 pieces, else uint32)
    measured_on_mb: float  # raw input of the measuring build: a small one under-states the rates

    @property
    def kept_text_bytes(self) -> float:
        return self.tokens * self.bytes_per_token

    @property
    def raw_text_bytes(self) -> float:
        return self.kept_text_bytes / self.kept_share

    @property
    def build_hours_per_node(self) -> float:
        return self.raw_text_bytes / 1e6 / self.build_mb_per_second / 3600 / self.nodes

    @property
    def encode_hours_per_node(self) -> float:
        return self.kept_text_bytes / 1e6 / self.encode_mb_per_second / 3600 / self.nodes

    @property
    def corpus_disk_bytes(self) -> float:
        return self.kept_text_bytes * self.corpus_overhead

    @property
    def token_disk_bytes(self) -> float:
        return self.tokens * self.token_bytes


def plan_corpus(
    tokens: float, corpus: Path, tokens_dir: Path, nodes: int, vocab_size: int | None
) -> CorpusPlan:
    manifest, meta = read_manifest(corpus), read_meta(tokens_dir)
    kept_bytes = sum(split["bytes"] for split in manifest["splits"].values())
    corpus_file_bytes = sum(
        path.stat().st_size for split in manifest["splits"] for path in split_files(corpus, split)
    )
    encoded_tokens = sum(meta["tokens"].values())
    if not encoded_tokens or not manifest["input_bytes"]:
        raise UserError(
            f"{corpus} and {tokens_dir} hold no text to measure rates from; build a real corpus first"
        )
    return CorpusPlan(
        tokens=tokens,
        nodes=nodes,
        bytes_per_token=meta["text_bytes"] / encoded_tokens,
        kept_share=kept_bytes / manifest["input_bytes"],
        corpus_overhead=corpus_file_bytes / kept_bytes,
        build_mb_per_second=manifest["mb_per_second"],
        encode_mb_per_second=meta["mb_per_second"],
        token_bytes=token_dtype(vocab_size or meta["vocab_size"]).itemsize,
        measured_on_mb=manifest["input_bytes"] / 1e6,
    )
