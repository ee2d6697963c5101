"""Single-prompt generation with a KV cache: prefill once, then one token per forward pass."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from llmctl.infer.sampling import SamplingParams, sample_next
from llmctl.model import Transformer


@torch.inference_mode()
def generate_ids(model: Transformer, prompt_ids: list[int], params: SamplingParams) -> Iterator[int]:
    """Yield new token ids as they are produced; stops at a stop id, max_new_tokens or the context end."""
    context = model.config.max_seq_len
    if len(prompt_ids) >= context:
        raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the model's context is {context} tokens")
    device = model.lm_head.weight.device
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    budget = min(params.max_new_tokens, context - len(prompt_ids))
    cache = model.new_kv_cache(batch_size=1, max_len=len(prompt_ids) + budget)
    history = torch.tensor([prompt_ids], device=device)
    logits = model(history, kv_cache=cache)[:, -1]
    for _ in range(budget):
        next_id = sample_next(logits, params, history, generator)
        token = int(next_id.item())
        yield token
        if token in params.stop_token_ids:
            return
        history = torch.cat([history, next_id[:, None]], dim=1)
        if cache.length >= cache.max_len:
            return
        logits = model(next_id[:, None], kv_cache=cache)[:, -1]
