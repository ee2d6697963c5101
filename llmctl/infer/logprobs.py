"""Log-probabilities of tokens under the model: of each generated token (OpenAI's `logprobs`) and of each
prompt token (completions' `echo`, which evaluation harnesses score answers with).

They are the model's own distribution, before temperature, penalties, logit_bias or a grammar's mask change
what is sampled, as vLLM reports them by default: the same numbers an in-process scorer computes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # the likeliest ids and their log-probabilities, likeliest first


def token_logprobs(logits: torch.Tensor, tokens: Sequence[int], top: int) -> list[TokenLogprob]:
    """Row i of `logits` (rows, vocab) is the distribution `tokens[i]` was drawn from; each token's
    log-probability under it, with the `top` likeliest ids."""
    if not len(tokens):
        return []
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    chosen = log_probs.gather(1, torch.tensor(tokens, device=logits.device)[:, None])[:, 0].tolist()
    if top:
        values, ids = torch.topk(log_probs, min(top, log_probs.shape[-1]), dim=-1)
        alternatives = [
            tuple(zip(row_ids, row_values, strict=True))
            for row_ids, row_values in zip(ids.tolist(), values.tolist(), strict=True)
        ]
    else:
        alternatives = [()] * len(tokens)
    return [
        TokenLogprob(token, logprob, alternative)
        for token, logprob, alternative in zip(tokens, chosen, alternatives, strict=True)
    ]


def prompt_logprobs(logits: torch.Tensor, prompt_ids: Sequence[int], top: int) -> list[TokenLogprob | None]:
    """Each prompt token's log-probability given the tokens before it, from a prefill's (positions, vocab)
    logits; the first token has none (None)."""
    return [None, *token_logprobs(logits[: len(prompt_ids) - 1], list(prompt_ids[1:]), top)]
