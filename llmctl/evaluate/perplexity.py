"""Perplexity over whole documents with a sliding window, per token, per word and per byte, with a bootstrap
confidence interval over documents; and a paired bootstrap that says whether two models' bits per byte on
the same documents differ."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import numpy as np

from llmctl.data.tokenizer_base import Tokenizer
from llmctl.errors import UserError
from llmctl.evaluate.scoring import batched_continuation_logprobs, sliding_windows
from llmctl.model import Transformer


@dataclass
class PerplexityResult:
    documents: int
    tokens: int
    words: int
    bytes: int
    nll: float  # total, nats
    token_perplexity: float
    word_perplexity: float
    bits_per_byte: float
    ci95: tuple[float, float]  # token perplexity, bootstrap over documents
    # each document's nll (nats) and UTF-8 bytes: what `eval compare` pairs two results by
    per_document: dict[str, list[float] | list[int]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PairedDifference:
    """Bits per byte of the second result minus the first, on the same documents."""

    difference: float
    ci95: tuple[float, float]
    p_value: float  # two-sided, from the bootstrap distribution
    documents: int

    @property
    def significant(self) -> bool:
        return not self.ci95[0] <= 0.0 <= self.ci95[1]


def paired_bootstrap(
    first: dict, second: dict, samples: int = 2000, seed: int = 0
) -> PairedDifference | None:
    """Resample documents (the same picks for both models) and recompute each one's bits per byte: the
    spread of the difference is the noise of the document sample, paired so that what both models find hard
    cancels out. None when the two results were not measured on the same documents."""
    a, b = first.get("per_document") or {}, second.get("per_document") or {}
    if (
        not a.get("bytes")
        or a.get("bytes") != b.get("bytes")
        or len(a.get("nll", ())) != len(b.get("nll", ()))
    ):
        return None
    sizes = np.asarray(a["bytes"], dtype=np.float64)
    gap = (np.asarray(b["nll"]) - np.asarray(a["nll"])) / math.log(2)  # bits, per document
    picks = np.random.default_rng(seed).integers(0, len(sizes), size=(samples, len(sizes)))
    resampled = gap[picks].sum(1) / sizes[picks].sum(1)
    low, high = np.percentile(resampled, [2.5, 97.5])
    tail = min(float((resampled <= 0).mean()), float((resampled >= 0).mean()))
    return PairedDifference(
        float(gap.sum() / sizes.sum()), (float(low), float(high)), min(1.0, 2 * tail), len(sizes)
    )


WINDOWS_PER_PASS = 64  # windows gathered across documents before they are scored in batches
DOCUMENTS_PER_GROUP = 256  # documents encoded and held at once


def document_nlls(
    model: Transformer, documents: list[list[int]], window: int, stride: int, batch_size: int
) -> list[float]:
    """Each document's total negative log-likelihood (nats) over its sliding windows, the windows of many
    documents scored together in batches."""
    nlls = [0.0] * len(documents)
    pending: list[tuple[int, list[int], int]] = []

    def score() -> None:
        items = [(tokens, first_scored) for _, tokens, first_scored in pending]
        for (owner, _, _), (log_probs, _) in zip(
            pending, batched_continuation_logprobs(model, items, batch_size), strict=True
        ):
            nlls[owner] -= float(log_probs.double().sum())
        pending.clear()

    for owner, ids in enumerate(documents):
        for begin, end, first_scored in sliding_windows(len(ids), window, stride):
            pending.append((owner, ids[begin:end], first_scored - begin))
            if len(pending) >= WINDOWS_PER_PASS:
                score()
    score()
    return nlls


def perplexity(
    model: Transformer,
    tokenizer: Tokenizer,
    texts: Iterable[str],
    window: int | None = None,
    stride: int | None = None,
    seed: int = 0,
    bootstrap: int = 1000,
    batch_size: int = 8,
) -> PerplexityResult:
    """Each document is [bos] + its tokens, so its first real token is scored too. Windows are scored
    `batch_size` per forward; documents are encoded a group at a time, so memory stays flat."""
    context = model.config.max_seq_len
    window = window or context
    if window > context:
        raise UserError(f"--window {window} exceeds the model's context of {context} tokens")
    stride = stride or window // 2
    nlls: list[float] = []
    token_counts, words, document_bytes = [], 0, []
    group: list[list[int]] = []
    for text in texts:
        ids = [tokenizer.bos_id, *tokenizer.encode(text)]
        if len(ids) < 2:
            continue
        group.append(ids)
        token_counts.append(len(ids) - 1)
        words += len(text.split())
        document_bytes.append(len(text.encode()))
        if len(group) == DOCUMENTS_PER_GROUP:
            nlls += document_nlls(model, group, window, stride, batch_size)
            group = []
    nlls += document_nlls(model, group, window, stride, batch_size)
    if not nlls:
        raise UserError("no text to evaluate: the data is empty")
    nll, tokens, byte_count = float(sum(nlls)), int(sum(token_counts)), sum(document_bytes)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(nlls), size=(bootstrap, len(nlls)))
    resampled = np.exp(np.asarray(nlls)[picks].sum(1) / np.asarray(token_counts)[picks].sum(1))
    low, high = np.percentile(resampled, [2.5, 97.5])
    return PerplexityResult(
        documents=len(nlls),
        tokens=tokens,
        words=words,
        bytes=byte_count,
        nll=nll,
        token_perplexity=math.exp(nll / tokens),
        word_perplexity=math.exp(nll / max(words, 1)),
        bits_per_byte=nll / math.log(2) / max(byte_count, 1),
        ci95=(float(low), float(high)),
        per_document={"nll": nlls, "bytes": document_bytes},
    )
