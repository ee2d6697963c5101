"""One generation request as the serving engine holds it: its prompt, settings and callback, and what it has
produced so far (tokens, log-probabilities, the grammar state of a constrained one)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from llmctl.infer.constraints import Constraint
from llmctl.infer.logprobs import TokenLogprob
from llmctl.infer.sampling import SamplingParams

# on_token(token_id, finish_reason): token_id is None only on the final call; finish_reason is None
# until the request ends with "stop" (a stop id), "length" (max tokens or context), "cancelled" or
# "error" (this request failed; `Request.error` says why, and the engine serves the others on).
TokenCallback = Callable[[int | None, str | None], None]


@dataclass
class Request:
    id: int
    prompt_ids: list[int]
    params: SamplingParams
    on_token: TokenCallback
    submitted: float = field(default_factory=time.perf_counter)
    generated: list[int] = field(default_factory=list)
    history: torch.Tensor | None = None
    generator: torch.Generator | None = None
    cancelled: bool = False
    error: str | None = None
    engine_deaths: int = 0  # engine loops that died while it waited; a second fails it (it may be the cause)
    adapter: str | None = None  # which LoRA adapter of an `AdapterRouter` model serves it (None: the base)
    constraint: Constraint | None = None  # a grammar its tokens must follow (structured output)
    # with params.logprobs: one entry per generated token, appended before its on_token call
    logprobs: list[TokenLogprob] = field(default_factory=list)
    # with params.prompt_logprobs: one per prompt token (None for the first), filled at prefill
    prompt_logprobs: list[TokenLogprob | None] | None = None

    def cancel(self) -> None:
        """Safe from any thread: the engine frees the slot at the next token boundary."""
        self.cancelled = True
