"""Token log-likelihoods of a checkpoint: the one primitive perplexity and the lm-eval adapter share."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmctl.model import Transformer


@torch.inference_mode()
def continuation_logprobs(
    model: Transformer, tokens: list[int], score_from: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probability of each of tokens[score_from:], whether each is the greedy choice), given the rest.

    `tokens` must fit the context; score_from >= 1 (the first token has nothing to be predicted from).
    """
    ids = torch.tensor([tokens[:-1]], device=model.device)
    logits = model(ids)[0, score_from - 1 :].float()
    targets = torch.tensor(tokens[score_from:], device=logits.device)
    log_probs = F.log_softmax(logits, dim=-1)
    chosen = log_probs.gather(1, targets[:, None]).squeeze(1)
    return chosen.cpu(), (log_probs.argmax(-1) == targets).cpu()


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
