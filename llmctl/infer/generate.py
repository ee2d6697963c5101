"""Generation with a static KV cache: prefill once, then one token per forward pass.

`generate_ids` streams one prompt; `generate_batch` runs prompts of different lengths together (left
padding, with masks and positions so each prompt's output equals its output alone) and `n` samples per
prompt that share the prompt's prefill.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from llmctl.infer.constraints import Constraint
from llmctl.infer.decode import PaddedBatch, decode_step, fit_prompt, prefill_first_row
from llmctl.infer.prefix_cache import PrefixCache
from llmctl.infer.sampling import SamplingParams, sample_next
from llmctl.model import Transformer


def _generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    return torch.Generator(device=device).manual_seed(params.seed) if params.seed is not None else None


def without_stop_ids(ids: list[int], stop_token_ids: Iterable[int]) -> list[int]:
    """Generated ids as text-bearing tokens: a final stop id is not part of the output."""
    return ids[:-1] if ids and ids[-1] in set(stop_token_ids) else ids


@torch.inference_mode()
def generate_ids(
    model: Transformer,
    prompt_ids: list[int],
    params: SamplingParams,
    prefixes: PrefixCache | None = None,
    constraint: Constraint | None = None,
) -> Iterator[int]:
    """Yield new token ids as they are produced; stops at a stop id, max_new_tokens, the context end, or
    where `constraint`'s grammar (each token masked to what it allows) is complete.

    One row of a slot cache, decoded like a serving engine's row (and compiled where `compile_decode` ran).
    With `prefixes`, a prompt that begins like an earlier sequence (the previous turns of a chat) prefills
    only what follows it, and the finished sequence is kept for the next."""
    prompt_ids = fit_prompt(prompt_ids, model.config.max_seq_len)
    budget = min(params.max_new_tokens, model.config.max_seq_len - len(prompt_ids))
    cache = model.new_kv_cache(1, max_len=len(prompt_ids) + budget, slots=True)
    entry, reused = prefixes.lookup(prompt_ids) if prefixes is not None else (None, 0)
    if entry is not None:
        PrefixCache.restore(entry, reused, cache, 0)
    cache.lengths[0] = reused
    logits = prefill_first_row(model, prompt_ids[reused:], cache)
    history = torch.tensor([prompt_ids], device=model.device)
    generator = _generator(params, model.device)
    produced: list[int] = []
    try:
        for step in range(budget):
            if constraint is not None:
                logits = logits.clone()
                constraint.allow(logits[0], params.stop_token_ids)
            next_id = sample_next(logits, params, history, generator)
            produced.append(int(next_id))
            if constraint is not None:
                constraint.advance(produced[-1], params.stop_token_ids)
            yield produced[-1]
            if produced[-1] in params.stop_token_ids or step == budget - 1:
                return
            if constraint is not None and constraint.finished:
                return
            if params.penalised:  # only penalties look back at the tokens so far
                history = torch.cat([history, next_id[:, None]], dim=1)
            logits = decode_step(model, next_id, cache)
    finally:  # also when the caller stops early: what is cached is valid
        if prefixes is not None:
            prefixes.store([*prompt_ids, *produced][: int(cache.lengths[0])], cache, 0)


@torch.inference_mode()
def generate_batch(
    model: Transformer,
    prompts: list[list[int]],
    params: SamplingParams,
    n: int = 1,
    pad_id: int = 0,
    constraints: list[Constraint | None] | None = None,
) -> list[list[int]]:
    """New ids for every prompt (n consecutive outputs per prompt), stop ids included where hit. With
    `constraints`, one per output (or None), each output follows its own grammar and ends where it is
    complete."""
    batch = PaddedBatch(model, prompts, params.max_new_tokens, pad_id)
    device = model.device
    if n > 1:  # the n samples of a prompt share its prefill
        batch.select(torch.arange(len(prompts), device=device).repeat_interleave(n))
    generator = _generator(params, device)
    history, logits = batch.history(), batch.logits
    outputs: list[list[int]] = [[] for _ in range(len(history))]
    done = torch.zeros(len(history), dtype=torch.bool, device=device)
    stop = torch.tensor(list(params.stop_token_ids) or [-1], device=device)
    if constraints is not None and len(constraints) != len(history):
        raise ValueError(f"{len(constraints)} constraints for {len(history)} outputs")
    for produced in range(batch.budget):
        live = (~done).nonzero().flatten().tolist()
        if constraints is not None:
            logits = logits.clone()
            for row in live:
                if constraints[row] is not None:
                    constraints[row].allow(logits[row], params.stop_token_ids)
        next_ids = sample_next(logits, params, history, generator)
        for row in live:
            outputs[row].append(int(next_ids[row]))
            if constraints is not None and constraints[row] is not None:
                constraints[row].advance(outputs[row][-1], params.stop_token_ids)
                if constraints[row].finished:
                    done[row] = True
        done |= torch.isin(next_ids, stop)
        if bool(done.all()) or produced == batch.budget - 1:
            break
        history = torch.cat([history, next_ids[:, None]], dim=1)
        logits = batch.step(next_ids)
    return outputs
