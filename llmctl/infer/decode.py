"""The one prefill / decode-step path: greedy and sampled generation, batches, beam search and the serving
engine all run the model through `prefill` and `decode_step`, and static batches through `PaddedBatch`.

A decode step against a slot cache (one prompt's generation, the serving engine) can be compiled with
`compile_decode`: torch.compile of that one step, with the batch and the attended span as symbolic sizes, so
that one graph serves every batch size and length after a warm-up, as gpt-fast does. It removes the Python
and operator-dispatch cost that dominates a small model's step on a CPU (benchmarks/decode.py).
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from llmctl.checkpoint import is_adapter, open_checkpoint
from llmctl.data.chat_format import ChatFormat, open_chat_format
from llmctl.data.chat_template import TEMPLATE_FILE
from llmctl.data.tokenizer_base import Tokenizer
from llmctl.errors import UserError
from llmctl.infer.cpu_decode import use_decode_kernels
from llmctl.infer.fused_step import fused_step_for, use_fused_step
from llmctl.kernels import decode_ops
from llmctl.model import KVCache, Transformer
from llmctl.model.hf_format import read_quantization_config
from llmctl.model.kv_cache import DecodeRows, SlotKVCache


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


def load_for_inference(
    path: Path, adapter: Path | None = None, force_base: bool = False
) -> tuple[Transformer, Tokenizer]:
    """A checkpoint's model and tokenizer, with the CPU decode fast path swapped in (llmctl's projections, and
    the fused step where every layer is a plain fp32 one). With `adapter`, or when `path` is itself a LoRA
    adapter (its base recorded inside), the adapter is merged into the base, which must hold the weights it was
    trained on unless `force_base`."""
    if adapter is not None or is_adapter(path):
        from llmctl.adapters import open_adapted

        if adapter is None:
            model, tokenizer = open_adapted(path, force=force_base)
        else:
            model, tokenizer = open_adapted(adapter, base=path, force=force_base)
    else:
        model, tokenizer = open_checkpoint(path)
        if read_quantization_config(path) is not None:
            return model, tokenizer  # its quantized layers run in the decode kernels already
    use_decode_kernels(model)
    use_fused_step(model)
    return model, tokenizer


DEFAULT_CONTEXT = 8192  # what chat and serve reserve per row unless --context asks for more


def limit_context(model: Transformer, context: int | None) -> int:
    """Decode within `context` positions: by default the model's own, up to DEFAULT_CONTEXT, so a model
    trained for 128k positions does not reserve a 128k-position KV cache for every row. Returns it."""
    trained = model.config.max_seq_len
    if context is not None and context > trained:
        raise UserError(
            f"--context {context} is longer than the {trained} positions the model was trained for"
        )
    limit = context or min(trained, DEFAULT_CONTEXT)
    if limit < trained:
        model.config = replace(model.config, max_seq_len=limit)
        model.init_rope()  # the same angles, for the positions kept
    return limit


def open_chat(
    path: Path, tokenizer: Tokenizer, adapter: Path | None = None, template_file: Path | None = None
) -> ChatFormat:
    """The chat format of a model loaded by `load_for_inference(path, adapter)`: `template_file`, else the
    adapter's own chat_template.jinja (a finetune with a template of its own writes one), else the base's."""
    path = Path(path)
    if adapter is None and is_adapter(path):
        from llmctl.adapters import base_of

        adapter, path = path, base_of(path)
    own = Path(adapter) / TEMPLATE_FILE if adapter is not None else None
    if template_file is None and own is not None and own.is_file():
        template_file = own
    return open_chat_format(path, tokenizer, template_file)


def load_draft(path: Path, tokenizer: Tokenizer, model: Transformer) -> Transformer:
    """The draft model for speculative decoding (chat, serve); it must speak the model's tokenizer."""
    draft, draft_tokenizer = load_for_inference(path)
    if draft_tokenizer.sha256() != tokenizer.sha256() or draft.config.vocab_size != model.config.vocab_size:
        raise UserError(
            f"the draft {path} has a different tokenizer from the model's; a draft must be trained on the "
            "same tokenizer (a distilled student of the model, say)"
        )
    return draft


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
    logits = model(ids, position_ids=position_ids, attention_mask=attention_mask, kv_cache=cache)
    return logits[:, -1]


@torch.inference_mode()
def prefill_first_row(model: Transformer, ids: list[int], cache: SlotKVCache) -> torch.Tensor:
    """`ids` fed to the cache's first row after its length; the next-token logits (1, vocab). Up to MAX_ROWS
    tokens (a short prompt, a chat turn after its reused prefix) are one call of the fused step where the
    model has one: ~3x quicker than a forward of a small model's operators. Longer ones are one forward,
    whose batched products and attention are quicker than the fused step's chunks."""
    tokens = torch.tensor([ids], device=model.device)
    fused = fused_step_for(model, 1, len(ids))
    if fused is not None:
        return fused(model, tokens, cache.rows(1, len(ids)), last_only=True)[:, -1]
    row = cache.row(0)
    row.length = int(cache.lengths[0])
    logits = prefill(model, tokens, row)
    cache.lengths[0] = row.length
    return logits


@torch.inference_mode()
def prefill_rows(
    model: Transformer, prompts: list[list[int]], cache: KVCache, all_positions: bool = False
) -> torch.Tensor:
    """Prompts of different lengths into the rows of `cache`, right-padded in one forward; each row's
    next-token logits (B, vocab), or with `all_positions` every position's (B, longest, vocab). Causal
    attention never lets a prompt see the padding after it; the padding written past a row's length is masked
    out and overwritten by its decode steps (a slot cache)."""
    width = max(len(prompt) for prompt in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long, device=model.device)
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt)] = torch.tensor(prompt, device=model.device)
    logits = model(ids, kv_cache=cache)
    return logits if all_positions else last_positions(logits, prompts)


def last_positions(logits: torch.Tensor, prompts: list[list[int]]) -> torch.Tensor:
    """Each right-padded row's logits at its prompt's last token: (B, longest, vocab) -> (B, vocab)."""
    last = torch.tensor([len(prompt) - 1 for prompt in prompts], device=logits.device)
    return logits[torch.arange(len(prompts), device=logits.device), last]


StepFunction = Callable[..., torch.Tensor]
_compiled_steps: weakref.WeakKeyDictionary[Transformer, StepFunction] = weakref.WeakKeyDictionary()
# Every compiled model shares `_rows_step`'s code, whose graphs dynamo counts together unless each model's are
# kept apart (torch >= 2.13): a few per model (one row; more rows through llmctl's kernel or past its MAX_ROWS;
# one token per row or several), so several served models and their drafts pass dynamo's default limit of 8,
# which fails a fullgraph compile.
STEP_GRAPHS = 64


def _rows_step(
    model: Transformer,
    ids: torch.Tensor,
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    positions: torch.Tensor,
    span: int,
) -> torch.Tensor:
    """New tokens (B, width) for the first rows of a slot cache; their logits (B, width, vocab)."""
    return model(ids, kv_cache=DecodeRows(keys, values, positions, span))


def compile_decode(model: Transformer) -> None:
    """Run this model's slot-cache decode steps through torch.compile from now on (inductor: C++ with a C++
    wrapper on a CPU, Triton kernels replayed as CUDA graphs on a GPU). The first steps of each class of batch
    size and width compile, which takes tens of seconds; `warm_up_decode` does that before serving."""
    use_compiled_step(model, compiled_step(model))


def use_compiled_step(model: Transformer, step: StepFunction) -> None:
    """From the next decode step on, `step` runs this model's slot-cache steps (`decode_rows` looks it up
    at every step, so a step compiled in another thread takes over between two steps)."""
    _compiled_steps[model] = step


def compiled_step(model: Transformer) -> StepFunction:
    """torch.compile of the slot-cache decode step with this machine's options; nothing is traced until the
    step first runs."""
    compile_parameters = inspect.signature(torch.compile).parameters
    isolated = "isolate_recompiles" in compile_parameters  # torch >= 2.13: each model's graphs kept apart
    if model.device.type == "cpu":  # a C++ wrapper calls the kernels: no Python between them (~15% here)
        decode_ops()  # built and loaded before tracing, which must not build it
        # No size, stride or alignment checks in the wrapper on every tensor of every step (~110 for a 6-layer
        # model, ~3% of its step): dynamo's guards have checked the step's inputs, and the kernels' outputs
        # have the shapes their fakes declare (tests/test_kernels.py).
        inductor: dict[str, object] = {"cpp_wrapper": True, "size_asserts": False, "alignment_asserts": False}
        if isolated:
            # The graphs serve this model alone (`_compiled_steps`), whose modules and weights' shapes do not
            # change once it is loaded, so dynamo need not check them before every step, only the step's
            # inputs (ids, cache, positions): the ~70 weights' checks were ~4% of a small model's step.
            inductor["guard_filter_fn"] = torch.compiler.skip_guard_on_all_nn_modules_unsafe
        options: dict[str, object] = {"options": inductor}
    else:  # CUDA graphs replay the whole step in one launch
        options = {"mode": "reduce-overhead"}
    if isolated:
        options.update(isolate_recompiles=True, recompile_limit=STEP_GRAPHS)  # this model's own graphs
    elif "recompile_limit" in compile_parameters:  # per function: every model's graphs count together
        options["recompile_limit"] = STEP_GRAPHS
    else:  # before, one global setting (since 2.13 it is per thread: the engine's would not see it)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, STEP_GRAPHS)
    return _floats_as_constants(torch.compile(_rows_step, dynamic=True, fullgraph=True, **options))


def _floats_as_constants(step: StepFunction) -> StepFunction:
    """`step` traced with the model's Python floats (each norm's eps) as constants of its graphs. By default
    dynamo makes each an input, turned into a tensor before every step: 13 for a 6-layer model, ~3% of its
    step on a CPU. Dynamo's settings are per thread and a step may be traced in any thread (an engine's, a
    chat's), so the setting is made around each call (~3 us) and restored after it."""
    config = torch._dynamo.config

    def step_with_constant_floats(*args: object) -> torch.Tensor:
        saved = config.specialize_float
        config.specialize_float = True
        try:
            return step(*args)
        finally:
            config.specialize_float = saved

    return step_with_constant_floats


@torch.inference_mode()
def warm_up_decode(
    model: Transformer, cache: SlotKVCache, widths: tuple[int, ...] = (1,), step: StepFunction | None = None
) -> None:
    """Compile the decode step (the model's own, or `step`) for every class of batch it will serve, `widths`
    new tokens per row (a verifying pass takes a draft's proposals and one more): one row, two, and the
    cache's every row (which may pass the kernel's MAX_ROWS), on a cache with as many slots as the one it will
    serve (its length is a symbolic size). Leaves the cache empty."""
    for width in widths:
        for batch in sorted({1, min(2, len(cache.lengths)), len(cache.lengths)}):
            cache.lengths[:batch] = 1
            ids = torch.zeros((batch, width), dtype=torch.long, device=cache.lengths.device)
            decode_rows(model, ids, cache, step)
    cache.lengths.zero_()


@torch.inference_mode()
def decode_rows(
    model: Transformer, ids: torch.Tensor, cache: SlotKVCache, step: StepFunction | None = None
) -> torch.Tensor:
    """Feed `width` new tokens to each of the first B slots, (B, width), each row after its own length; their
    logits (B, width, vocab). The step is `step`, else the fused one where it serves this step
    (llmctl.infer.fused_step), else the compiled one where `compile_decode` ran."""
    rows = cache.rows(ids.shape[0], ids.shape[1])
    fused = fused_step_for(model, ids.shape[0], ids.shape[1]) if step is None else None
    if fused is not None:
        return fused(model, ids, rows)
    step = step or _compiled_steps.get(model, _rows_step)
    return step(model, ids, rows.keys, rows.values, rows.positions, rows.span)


@torch.inference_mode()
def decode_step(
    model: Transformer,
    next_ids: torch.Tensor,
    cache: KVCache | SlotKVCache,
    *,
    position_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Feed one new token per row, (B,); the next-token logits (B, vocab). Against a slot cache the rows are
    its first B slots, each at its own length (`decode_rows`)."""
    if isinstance(cache, SlotKVCache):
        return decode_rows(model, next_ids[:, None], cache)[:, -1]
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
