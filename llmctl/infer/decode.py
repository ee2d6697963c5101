"""The one prefill / decode-step path: greedy and sampled generation, batches, beam search and the serving
engine all run the model through `prefill` and `decode_step`, and static batches through `PaddedBatch`."""

from __future__ import annotations

from pathlib import Path

import torch

from llmctl.checkpoint import is_adapter, open_checkpoint
from llmctl.data.tokenizer import Tokenizer
from llmctl.infer.cpu_decode import few_row_threads, use_numpy_blas
from llmctl.model import KVCache, Transformer
from llmctl.model.hf_format import read_quantization_config
from llmctl.model.kv_cache import SlotKVCache


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


def load_for_inference(path: Path, adapter: Path | None = None) -> tuple[Transformer, Tokenizer]:
    """A checkpoint's model and tokenizer, with the CPU decode fast path swapped in. With `adapter`, or when
    `path` is itself a LoRA adapter (its base recorded inside), the adapter is merged into the base."""
    if adapter is not None or is_adapter(path):
        from llmctl.adapters import open_adapted

        model, tokenizer = open_adapted(adapter, base=path) if adapter else open_adapted(path)
    else:
        model, tokenizer = open_checkpoint(path)
        if read_quantization_config(path) is not None:
            return model, tokenizer  # its kernels run on torch's threads, which the numpy path would take
    use_numpy_blas(model)
    return model, tokenizer


@torch.inference_mode()
def prefill(
    model: Transformer,
    ids: torch.Tensor,
    cache: KVCache,
    *,
    position_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run prompts (B, T) into `cache`; the next-token logits (B, vocab)."""
    with few_row_threads(model, ids.numel()):
        logits = model(ids, position_ids=position_ids, attention_mask=attention_mask, kv_cache=cache)
    return logits[:, -1]


@torch.inference_mode()
def decode_step(
    model: Transformer,
    next_ids: torch.Tensor,
    cache: KVCache | SlotKVCache,
    *,
    position_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Feed one new token per row, (B,); the next-token logits (B, vocab)."""
    with few_row_threads(model, next_ids.numel()):
        logits = model(
            next_ids[:, None], position_ids=position_ids, attention_mask=attention_mask, kv_cache=cache
        )
    return logits[:, -1]


class PaddedBatch:
    """Prompts of different lengths decoded together in one static cache.

    Prompts are left-padded; masks and positions make each row's output equal to its output alone. Prompts
    of one length need neither, and take SDPA's plain causal path. `budget` is how many tokens every row
    may still generate within the context and `max_new_tokens`.
    """

    def __init__(
        self, model: Transformer, prompts: list[list[int]], max_new_tokens: int, pad_id: int = 0
    ) -> None:
        context = model.config.max_seq_len
        prompts = [fit_prompt(prompt, context) for prompt in prompts]
        device = model.device
        width = max(len(prompt) for prompt in prompts)
        self.model, self.budget = model, min(max_new_tokens, context - width)
        self.cache = model.new_kv_cache(batch_size=len(prompts), max_len=width + self.budget)
        self.ids = torch.full((len(prompts), width), pad_id, device=device)  # (B, width)
        self.mask: torch.Tensor | None = None  # (B, cached): 1 for real tokens, 0 for padding
        for row, prompt in enumerate(prompts):
            self.ids[row, width - len(prompt) :] = torch.tensor(prompt, device=device)
        self.positions: torch.Tensor | None = None  # (B, 1): the next position of each row
        if any(len(prompt) != width for prompt in prompts):
            lengths = torch.tensor([len(prompt) for prompt in prompts], device=device)
            self.mask = (torch.arange(width, device=device)[None, :] >= width - lengths[:, None]).long()
            positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
            self.logits = prefill(
                model, self.ids, self.cache, position_ids=positions, attention_mask=self.mask
            )
            self.positions = positions[:, -1:] + 1
        else:
            self.logits = prefill(model, self.ids, self.cache)  # (B, vocab)

    def history(self) -> torch.Tensor:
        """The prompt ids, (B, width), with padding as -1 (the penalties ignore it)."""
        return self.ids if self.mask is None else self.ids.masked_fill(self.mask == 0, -1)

    def select(self, rows: torch.Tensor) -> None:
        """Keep (and repeat) rows: n samples or beams sharing a prompt's prefill, surviving beams."""
        self.cache.reorder(rows)
        self.ids, self.logits = self.ids[rows], self.logits[rows]
        if self.mask is not None:
            self.mask, self.positions = self.mask[rows], self.positions[rows]

    def step(self, next_ids: torch.Tensor) -> torch.Tensor:
        """Feed each row's next id, (B,); the next logits (B, vocab)."""
        if self.mask is None:
            self.logits = decode_step(self.model, next_ids, self.cache)
            return self.logits
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        self.logits = decode_step(
            self.model, next_ids, self.cache, position_ids=self.positions, attention_mask=self.mask
        )
        self.positions = self.positions + 1
        return self.logits
