"""Token log-likelihoods of a checkpoint: the one primitive perplexity and the lm-eval adapter share, one
sequence at a time or many in length-sorted, right-padded batches."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmctl.model import Transformer


def continuation_logprobs(
    model: Transformer, tokens: list[int], score_from: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probability of each of tokens[score_from:], whether each is the greedy choice), given the rest.

    `tokens` must fit the context; score_from >= 1 (the first token has nothing to be predicted from).
    """
    return batched_continuation_logprobs(model, [(tokens, score_from)], batch_size=1)[0]


# logits of a batch are (rows, width, vocab) fp32: bound rows x width so that a long-context batch stays ~1 GB
TOKENS_PER_BATCH = 8192


@torch.inference_mode()
def batched_continuation_logprobs(
    model: Transformer, items: list[tuple[list[int], int]], batch_size: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`continuation_logprobs` of every (tokens, score_from), in the order given.

    Items whose model input (all tokens but the last) is the same share one forward row: the choices of a
    multiple-choice question with one-token answers cost one sequence, as in lm-eval's `hf` model. Inputs
    are sorted longest first and right-padded into batches of up to `batch_size` rows (fewer where rows x
    width would pass TOKENS_PER_BATCH). Causal attention never lets a real token see the padding after it,
    so each row's scores are its scores alone.
    """
    sharing: dict[tuple[int, ...], list[int]] = {}
    for index, (tokens, _) in enumerate(items):
        sharing.setdefault(tuple(tokens[:-1]), []).append(index)
    inputs = sorted(sharing, key=len, reverse=True)
    results: list[tuple[torch.Tensor, torch.Tensor]] = [None] * len(items)  # type: ignore[list-item]
    start = 0
    while start < len(inputs):
        width = len(inputs[start])
        rows = max(1, min(batch_size, TOKENS_PER_BATCH // max(width, 1)))
        chunk = inputs[start : start + rows]
        ids = torch.zeros((len(chunk), width), dtype=torch.long, device=model.device)
        for row, sequence in enumerate(chunk):
            ids[row, : len(sequence)] = torch.tensor(sequence, device=model.device)
        logits = model(ids)
        for row, sequence in enumerate(chunk):
            for index in sharing[sequence]:
                tokens, score_from = items[index]
                scored = logits[row, score_from - 1 : len(tokens) - 1].float()
                targets = torch.tensor(tokens[score_from:], device=scored.device)
                log_probs = F.log_softmax(scored, dim=-1)
                chosen = log_probs.gather(1, targets[:, None]).squeeze(1)
                results[index] = (chosen.cpu(), (log_probs.argmax(-1) == targets).cpu())
        start += len(chunk)
    return results


def sliding_windows(length: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) covering positions 1..length-1 exactly once.

    Each window sees up to `window` tokens; after the first, only its last `stride`-ish new tokens are
    scored, the rest being context (the Hugging Face perplexity recipe). A window always keeps at least one
    token of context, so `stride >= window` (non-overlapping windows) still scores every position once.
    """
    spans, scored_until = [], 1
    begin = 0
    while scored_until < length:
        end = min(begin + window, length)
        spans.append((begin, end, scored_until))
        scored_until = end
        if end == length:
            break
        begin = min(begin + stride, scored_until - 1)
    return spans
