"""Speculative decoding: a small draft model proposes a few tokens, the target checks them all in one forward
pass, and the standard accept/reject rule (Leviathan et al. 2023, Chen et al. 2023) keeps the output
distribution exactly the target's. Greedy output is token-identical to decoding the target alone.

Both models keep a one-row slot cache and run through `infer.decode` (`prefill`, `decode_rows`), so a
compiled decode step and the CPU kernels serve the draft's steps and the target's verifying pass as they
serve any decode; tokens the target rejects are forgotten by setting the row's length back, nothing is copied.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from llmctl.infer.constraints import Constraint
from llmctl.infer.decode import decode_rows, fit_prompt, prefill
from llmctl.infer.sampling import SamplingParams, distributions, inverse_cdf
from llmctl.model import Transformer
from llmctl.model.kv_cache import SlotKVCache

DEFAULT_LOOKAHEAD = 4


@dataclass
class SpeculationStats:
    """How well the draft guessed: accepted / proposed is the acceptance rate."""

    proposed: int = 0
    accepted: int = 0
    target_passes: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


def check_draft(target: Transformer, draft: Transformer) -> None:
    """A draft must share the target's vocabulary: its ids are the target's ids."""
    if draft.config.vocab_size != target.config.vocab_size:
        raise ValueError(
            f"the draft model's vocabulary ({draft.config.vocab_size}) differs from the target's "
            f"({target.config.vocab_size}); a draft must use the target's tokenizer"
        )


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One id from a distribution (vocab,), drawn as `sample_next` draws."""
    draw = torch.rand(1, 1, generator=generator, device=probs.device)
    return int(inverse_cdf(probs[None], draw))


@torch.inference_mode()
def speculative_generate_ids(
    target: Transformer,
    draft: Transformer,
    prompt_ids: list[int],
    params: SamplingParams,
    lookahead: int = DEFAULT_LOOKAHEAD,
    stats: SpeculationStats | None = None,
    constraint: Constraint | None = None,
) -> Iterator[int]:
    """Yield new token ids as `generate_ids` does, up to `lookahead` draft tokens checked per target pass.
    Under `constraint` the draft proposes from its masked distribution and the target checks each proposal
    against its own, masked at the same position, so the output follows the grammar with the target's
    masked distribution.

    Each round the newest token (not yet in either cache) and the draft's proposals go through the target
    together; proposal i is kept with probability min(1, p_i / q_i), the first one refused is replaced by a
    draw from the residual max(0, p_i - q_i), and when all are kept a bonus token comes from the target's
    next distribution. Penalties count, for each position, the tokens before it, proposals included.
    """
    check_draft(target, draft)
    context = min(target.config.max_seq_len, draft.config.max_seq_len)
    prompt_ids = fit_prompt(prompt_ids, context)
    budget = min(params.max_new_tokens, context - len(prompt_ids))
    stats = stats if stats is not None else SpeculationStats()
    generator = (
        torch.Generator(device=target.device).manual_seed(params.seed) if params.seed is not None else None
    )
    room = len(prompt_ids) + budget + lookahead + 1
    target_cache = target.new_kv_cache(1, max_len=room, slots=True)
    draft_cache = draft.new_kv_cache(1, max_len=room, slots=True)
    if len(prompt_ids) > 1:  # the last prompt token goes in with the first proposals
        for model, cache in ((target, target_cache), (draft, draft_cache)):
            prefill(model, torch.tensor([prompt_ids[:-1]], device=model.device), cache.row(0))
            cache.lengths[0] = len(prompt_ids) - 1
    newest, draft_pending = prompt_ids[-1], [prompt_ids[-1]]
    history = list(prompt_ids)  # the prompt and every token emitted: what the penalties count
    produced = 0
    while True:
        # proposals must leave room for the verifying pass within the context, and need not pass the budget
        start = int(target_cache.lengths[0])
        k = max(0, min(lookahead, budget - produced - 1, context - start - 1))
        proposals, draft_probs, allowed = _propose(
            draft, draft_cache, draft_pending, params, generator, k, history, constraint
        )
        verify = torch.tensor([[newest, *proposals]], device=target.device)
        histories = [history + proposals[:index] for index in range(k + 1)]
        logits = decode_rows(target, verify, target_cache)[0]
        for position, mask in enumerate(allowed):
            logits[position].masked_fill_(~mask.to(logits.device), float("-inf"))
        target_probs = distributions(logits, [params] * (k + 1), histories)
        accepted, token = accept(proposals, draft_probs, target_probs, generator)
        stats.proposed += k
        stats.accepted += accepted
        stats.target_passes += 1
        for emitted in [*proposals[:accepted], token]:
            if constraint is not None:
                constraint.advance(emitted, params.stop_token_ids)
            yield emitted
            history.append(emitted)
            produced += 1
            if emitted in params.stop_token_ids or produced == budget:
                return
            if constraint is not None and constraint.finished:
                return
        # forget what was refused: the target cached newest + k proposals, the draft its pending + k - 1
        target_cache.lengths[0] = start + 1 + accepted
        if k:
            draft_cache.lengths[0] -= (k - 1) - min(accepted, k - 1)
            draft_pending = proposals[k - 1 :] if accepted == k else []
        draft_pending = [*draft_pending, token]
        newest = token


def _propose(
    draft: Transformer,
    cache: SlotKVCache,
    pending: list[int],
    params: SamplingParams,
    generator: torch.Generator | None,
    k: int,
    history: list[int],
    constraint: Constraint | None = None,
) -> tuple[list[int], list[torch.Tensor], list[torch.Tensor]]:
    """Feed the draft the tokens it has not seen, then sample `k` proposals after `history`, each with the
    distribution it was drawn from; under `constraint`, masked to it, with what the grammar allows at each of
    the k + 1 positions the target checks (the grammar itself is left where it was)."""
    proposals: list[int] = []
    drawn_from: list[torch.Tensor] = []
    allowed: list[torch.Tensor] = []
    advanced = 0
    if k:
        logits = decode_rows(draft, torch.tensor([pending], device=draft.device), cache)[0, -1:]
        pending.clear()
    for step in range(k):
        if constraint is not None:
            allowed.append(constraint.allowed(params.stop_token_ids))
            logits = logits.masked_fill(~allowed[-1].to(logits.device), float("-inf"))
        probs = distributions(logits, [params], [history + proposals])[0]
        proposals.append(draw(probs, generator))
        drawn_from.append(probs)
        if constraint is not None:
            advanced += constraint.advance(proposals[-1], params.stop_token_ids)
        if step < k - 1:
            logits = decode_rows(draft, torch.tensor([[proposals[-1]]], device=draft.device), cache)[0, -1:]
    if constraint is not None:
        allowed.append(constraint.allowed(params.stop_token_ids))
        constraint.rollback(advanced)
    return proposals, drawn_from, allowed


def accept(
    proposals: list[int],
    draft_probs: list[torch.Tensor],
    target_probs: torch.Tensor,
    generator: torch.Generator | None,
) -> tuple[int, int]:
    """(how many proposals are kept, the token that follows them) by the accept/reject rule."""
    for index, token in enumerate(proposals):
        p, q = target_probs[index], draft_probs[index].to(target_probs.device)
        ratio = float(p[token]) / max(float(q[token]), 1e-30)
        if ratio >= 1.0 or float(torch.rand(1, generator=generator, device=p.device)) < ratio:
            continue
        residual = (p - q).clamp(min=0)
        total = float(residual.sum())
        return index, draw(residual / total if total > 0 else p, generator)
    return len(proposals), draw(target_probs[len(proposals)], generator)
