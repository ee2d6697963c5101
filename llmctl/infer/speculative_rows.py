"""Speculative decoding inside the serving engine's continuous batch (`llmctl serve --draft`).

Each round the draft proposes up to `lookahead` tokens for every active row, one batched draft step at a
time, and the target checks them all in one forward over (rows, proposals + 1) tokens. Each row keeps its own
accepted prefix by the accept/reject rule of `llmctl.infer.speculative`, so every request gets the target's
distribution, and greedy requests the target's own tokens.

The draft keeps a slot cache beside the target's with the same rows: refused proposals are forgotten by
setting both caches' lengths back, nothing is copied. A round's first draft step feeds each row's last two
tokens, so that the last proposal of a round whose proposals were all kept (which the draft never saw) is
cached then, without a draft step of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmctl.infer.decode import compile_decode, decode_rows, prefill_rows, warm_up_decode
from llmctl.infer.request import Request
from llmctl.infer.sampling import SamplingParams, distributions
from llmctl.infer.speculative import DEFAULT_LOOKAHEAD, SpeculationStats, accept, check_draft, draw
from llmctl.model import Transformer
from llmctl.model.kv_cache import SlotKVCache


@dataclass
class Proposals:
    """One round's draft output: per row, the proposed ids and the distribution each was drawn from."""

    newest: torch.Tensor  # (rows,): each row's last token, in neither cache yet
    tokens: list[list[int]]
    drawn_from: list[list[torch.Tensor]]
    histories: list[list[int]]  # what each row's penalties count before the proposals (empty: no penalties)
    start: torch.Tensor  # (rows,): the cache lengths before the round
    # a constrained row's allowed tokens at each position of the verifying pass (width + 1); None: free
    allowed: list[list[torch.Tensor] | None]

    @property
    def width(self) -> int:
        return len(self.tokens[0])


def _history(request: Request) -> list[int]:
    return request.history[0].tolist() if request.params.penalised and request.history is not None else []


def _masked(
    logits: torch.Tensor, requests: list[Request], allowed: list[list[torch.Tensor] | None]
) -> torch.Tensor:
    """The draft's next-token logits (rows, vocab) with each constrained row masked to its grammar, whose
    mask is kept for the target's pass at the same position."""
    if all(row_allowed is None for row_allowed in allowed):
        return logits
    logits = logits.clone()
    for row, request in enumerate(requests):
        if request.constraint is not None:
            mask = request.constraint.allowed(request.params.stop_token_ids).to(logits.device)
            allowed[row].append(mask)
            logits[row].masked_fill_(~mask[: logits.shape[-1]], float("-inf"))
    return logits


def _pick(probs: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    return int(probs.argmax()) if params.greedy else draw(probs, generator)


class DraftRows:
    """A draft model and its slot cache, serving the rows of one engine."""

    def __init__(
        self, target: Transformer, draft: Transformer, max_batch: int, lookahead: int = DEFAULT_LOOKAHEAD
    ) -> None:
        check_draft(target, draft)
        if lookahead < 1:
            raise ValueError(f"lookahead must be at least 1 (got {lookahead})")
        self.target, self.draft, self.lookahead = target, draft.eval(), lookahead
        self.context = min(target.config.max_seq_len, draft.config.max_seq_len)
        self.cache = draft.new_kv_cache(max_batch, max_len=self.context, slots=True)
        self.stats = SpeculationStats()

    def compile(self, target_cache: SlotKVCache) -> None:
        """Compile the draft's steps (two tokens a row, then one) and the target's verifying step, before
        the first request."""
        compile_decode(self.draft)
        warm_up_decode(self.draft, self.cache, widths=(1, 2))
        compile_decode(self.target)
        warm_up_decode(self.target, target_cache, widths=(1, self.lookahead + 1))

    def prefill(self, prompts: list[list[int]], first: int) -> None:
        """The draft's side of admitting `prompts` into slots first..: the same positions as the target's."""
        prefill_rows(self.draft, prompts, self.cache.rows_from(first, len(prompts)))
        for slot, prompt in enumerate(prompts, start=first):
            self.cache.lengths[slot] = len(prompt)

    def move(self, source: int, target: int) -> None:
        self.cache.move(source, target)

    def reset(self) -> None:
        self.cache.lengths.zero_()

    @torch.inference_mode()
    def propose(self, requests: list[Request], target_cache: SlotKVCache) -> Proposals:
        """Up to `lookahead` proposals per row (fewer near the end of the context), drawn from the draft as
        each request samples. The first step (re)writes each row's last two positions, whichever of them the
        draft has not cached yet."""
        batch = len(requests)
        start = target_cache.lengths[:batch].clone()
        # a row ends once its sequence fills the context: the last token emitted is never fed back
        width = max(0, min(self.lookahead, self.context - 2 - int(start.max())))
        histories = [_history(request) for request in requests]
        device = self.draft.device
        newest = torch.tensor([request.generated[-1] for request in requests], device=device)
        before = [(request.generated[-2:-1] or request.prompt_ids[-1:])[0] for request in requests]
        tokens: list[list[int]] = [[] for _ in requests]
        drawn_from: list[list[torch.Tensor]] = [[] for _ in requests]
        self.cache.lengths[:batch] = start.to(self.cache.lengths.device) - 1
        feed = torch.stack([torch.tensor(before, device=device), newest], dim=1)  # (rows, 2)
        if width == 0:  # near the context's end the target's pass goes alone; the draft still keeps up
            decode_rows(self.draft, feed, self.cache)
        allowed: list[list[torch.Tensor] | None] = [
            [] if r.constraint is not None else None for r in requests
        ]
        advanced = [0] * batch  # tokens each row's grammar took, given back after the round
        for _ in range(width):
            logits = decode_rows(self.draft, feed, self.cache)[:, -1]
            logits = _masked(logits, requests, allowed)
            probs = distributions(
                logits, [r.params for r in requests], [h + t for h, t in zip(histories, tokens, strict=True)]
            )
            for row, request in enumerate(requests):
                tokens[row].append(_pick(probs[row], request.params, request.generator))
                drawn_from[row].append(probs[row])
                if request.constraint is not None:
                    advanced[row] += request.constraint.advance(
                        tokens[row][-1], request.params.stop_token_ids
                    )
            feed = torch.tensor([[row_tokens[-1]] for row_tokens in tokens], device=device)
        for row, request in enumerate(requests):
            if (
                request.constraint is not None
            ):  # what may follow the last proposal; then the grammar forgets them
                allowed[row].append(request.constraint.allowed(request.params.stop_token_ids))
                request.constraint.rollback(advanced[row])
        return Proposals(newest, tokens, drawn_from, histories, start, allowed)

    @torch.inference_mode()
    def verify(self, proposals: Proposals, target_cache: SlotKVCache) -> torch.Tensor:
        """The target's logits at each row's newest token and proposals, (rows, width + 1, vocab)."""
        proposed = torch.tensor(proposals.tokens, dtype=torch.long, device=self.target.device)
        proposed = proposed.view(len(proposals.tokens), proposals.width)  # (rows, 0) near the context's end
        ids = torch.cat([proposals.newest[:, None].to(self.target.device), proposed], dim=1)
        return decode_rows(self.target, ids, target_cache)

    def accept(
        self, requests: list[Request], proposals: Proposals, logits: torch.Tensor, target_cache: SlotKVCache
    ) -> list[list[int]]:
        """Each row's new tokens (its accepted proposals and one more) by the accept/reject rule; both caches
        are set back to the accepted positions."""
        width = proposals.width
        params = [request.params for request in requests for _ in range(width + 1)]
        histories = [
            history + tokens[:index]
            for history, tokens in zip(proposals.histories, proposals.tokens, strict=True)
            for index in range(width + 1)
        ]
        if any(row_allowed is not None for row_allowed in proposals.allowed):
            logits = logits.clone()  # the engine reports log-probabilities from the unmasked logits
            for row, row_allowed in enumerate(proposals.allowed):
                for position, mask in enumerate(row_allowed or ()):
                    logits[row, position].masked_fill_(~mask.to(logits.device), float("-inf"))
        target_probs = distributions(logits.reshape(-1, logits.shape[-1]), params, histories)
        target_probs = target_probs.view(len(requests), width + 1, -1)
        emitted, kept_counts = [], []
        for row, request in enumerate(requests):
            kept, token = accept(
                proposals.tokens[row], proposals.drawn_from[row], target_probs[row], request.generator
            )
            emitted.append([*proposals.tokens[row][:kept], token])
            kept_counts.append(kept)
            self.stats.proposed += width
            self.stats.accepted += kept
        self.stats.target_passes += 1
        lengths = proposals.start + 1 + torch.tensor(kept_counts, device=proposals.start.device)
        target_cache.lengths[: len(requests)] = lengths
        self.cache.lengths[: len(requests)] = lengths.to(self.cache.lengths.device)
        return emitted
