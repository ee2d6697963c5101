"""Generation with a static KV cache: prefill once, then one token per forward pass.

`generate_ids` streams one prompt; `generate_batch` runs prompts of different lengths together (left
padding, with masks and positions so each prompt's output equals its output alone) and `n` samples per
prompt that share the prompt's prefill.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from llmctl.infer.sampling import SamplingParams, sample_next
from llmctl.model import Transformer
from llmctl.runtime import decode_threads


class PromptTooLong(ValueError):
    """The prompt leaves no room to generate within the model's context."""

    def __init__(self, prompt_tokens: int, context: int) -> None:
        super().__init__(
            f"the prompt has {prompt_tokens} tokens but the model's context is {context} tokens "
            "(shorten it, or ask for left truncation)"
        )
        self.prompt_tokens, self.context = prompt_tokens, context


def fit_prompt(prompt_ids: list[int], context: int, truncate_left: bool = False) -> list[int]:
    """Keep at least one position free for generation; drop the oldest tokens only when asked to."""
    if len(prompt_ids) < context:
        return prompt_ids
    if not truncate_left:
        raise PromptTooLong(len(prompt_ids), context)
    return prompt_ids[len(prompt_ids) - context + 1 :]


def _generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    return torch.Generator(device=device).manual_seed(params.seed) if params.seed is not None else None


@torch.inference_mode()
def generate_ids(model: Transformer, prompt_ids: list[int], params: SamplingParams) -> Iterator[int]:
    """Yield new token ids as they are produced; stops at a stop id, max_new_tokens or the context end."""
    context = model.config.max_seq_len
    prompt_ids = fit_prompt(prompt_ids, context)
    device = model.lm_head.weight.device
    generator = _generator(params, device)
    budget = min(params.max_new_tokens, context - len(prompt_ids))
    cache = model.new_kv_cache(batch_size=1, max_len=len(prompt_ids) + budget)
    history = torch.tensor([prompt_ids], device=device)
    logits = model(history, kv_cache=cache)[:, -1]
    for produced in range(budget):
        next_id = sample_next(logits, params, history, generator)
        token = int(next_id)
        yield token
        if token in params.stop_token_ids or produced == budget - 1:
            return
        history = torch.cat([history, next_id[:, None]], dim=1)
        with decode_threads(device):
            logits = model(next_id[:, None], kv_cache=cache)[:, -1]


@torch.inference_mode()
def generate_batch(
    model: Transformer, prompts: list[list[int]], params: SamplingParams, n: int = 1, pad_id: int = 0
) -> list[list[int]]:
    """New ids for every prompt (n consecutive outputs per prompt), stop ids included where hit."""
    context = model.config.max_seq_len
    prompts = [fit_prompt(prompt, context) for prompt in prompts]
    device = model.lm_head.weight.device
    generator = _generator(params, device)
    width = max(len(prompt) for prompt in prompts)
    budget = min(params.max_new_tokens, context - width)
    ids = torch.full((len(prompts), width), pad_id, device=device)
    mask = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt, device=device)
        mask[row, width - len(prompt) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = model.new_kv_cache(batch_size=len(prompts), max_len=width + budget)
    logits = model(ids, position_ids=positions, attention_mask=mask, kv_cache=cache)[:, -1]
    if n > 1:  # the n samples of a prompt share its prefill
        expand = torch.arange(len(prompts), device=device).repeat_interleave(n)
        cache.reorder(expand)
        logits, ids, mask, positions = logits[expand], ids[expand], mask[expand], positions[expand]
    history = ids.masked_fill(mask == 0, -1)  # padding is ignored by the penalties
    outputs: list[list[int]] = [[] for _ in range(len(history))]
    done = torch.zeros(len(history), dtype=torch.bool, device=device)
    stop = torch.tensor(list(params.stop_token_ids) or [-1], device=device)
    next_position = positions[:, -1:] + 1
    for produced in range(budget):
        next_ids = sample_next(logits, params, history, generator)
        for row in (~done).nonzero().flatten().tolist():
            outputs[row].append(int(next_ids[row]))
        done |= torch.isin(next_ids, stop)
        if bool(done.all()) or produced == budget - 1:
            break
        history = torch.cat([history, next_ids[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        logits = model(next_ids[:, None], position_ids=next_position, attention_mask=mask, kv_cache=cache)[
            :, -1
        ]
        next_position = next_position + 1
    return outputs
