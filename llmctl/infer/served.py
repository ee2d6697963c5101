"""A model ready to serve: weights, tokenizer and a running continuous-batching engine, loaded up front."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from llmctl.data.chat_format import ChatFormat
from llmctl.data.tokenizer_base import Tokenizer
from llmctl.errors import UserError
from llmctl.infer.background_compile import compile_in_background
from llmctl.infer.constraints import Constraint, Constraints
from llmctl.infer.cpu_decode import use_decode_kernels
from llmctl.infer.decode import limit_context, load_draft, load_for_inference, open_chat
from llmctl.infer.engine import Engine
from llmctl.infer.logprobs import TokenLogprob
from llmctl.infer.sampling import SamplingParams
from llmctl.infer.speculative import DEFAULT_LOOKAHEAD
from llmctl.infer.text import TextChunk, TextStream
from llmctl.runtime import in_passing_thread


@dataclass
class ServedModel:
    name: str
    path: Path
    engine: Engine
    tokenizer: Tokenizer
    chat: (
        ChatFormat | str
    )  # how /v1/chat/completions renders for it, or why it cannot (a 400 for each request)
    adapter: str | None = None  # a LoRA adapter on an engine shared with the base's other adapters
    created: int = field(default_factory=lambda: int(time.time()))
    # event-loop time spent turning tokens into text and text into SSE events, cumulative (/metrics)
    stream_seconds: dict[str, float] = field(default_factory=lambda: {"detokenize": 0.0, "encode": 0.0})

    @property
    def context(self) -> int:
        return self.engine.context

    @cached_property
    def constraints(self) -> Constraints:
        """Compiles structured-output constraints against this model's tokenizer and vocabulary."""
        return Constraints(self.tokenizer, self.engine.model.config.vocab_size)


def load_served_model(
    name: str,
    path: Path,
    max_batch: int = 16,
    compile: bool | None = False,
    prefix_cache_tokens: int = 0,
    draft: Path | None = None,
    lookahead: int = DEFAULT_LOOKAHEAD,
    force_base: bool = False,
    chat_template: Path | None = None,
    context: int | None = None,
    report: Callable[[str], None] = lambda line: None,
) -> ServedModel:
    """Load and start (compiling the decode step first with `compile`; with None, on a CPU without a draft,
    compiling it in the background while the eager step serves, saying so through `report`); a checkpoint
    that cannot be served is a UserError now, not at the first request. An adapter directory is served merged into the base it
    records (refused on other base weights than it was trained on, unless `force_base`). With `draft`, a
    smaller checkpoint of the same tokenizer, every step decodes speculatively, `lookahead` draft tokens per
    row. A model with no chat format (`chat_template` names one) still serves completions. `context`: the
    positions each row may use (default: the model's, up to decode.DEFAULT_CONTEXT)."""
    path = Path(path)

    def load() -> ServedModel:
        model, tokenizer = load_for_inference(path, force_base=force_base)
        limit_context(model, context)
        draft_model = load_draft(Path(draft), tokenizer, model) if draft is not None else None
        engine = Engine(
            model,
            max_batch=max_batch,
            compile=bool(compile),
            prefix_cache_tokens=prefix_cache_tokens,
            draft=draft_model,
            lookahead=lookahead,
        ).start()
        chat = chat_or_reason(path, tokenizer, None, chat_template)
        return ServedModel(name=name, path=path, engine=engine, tokenizer=tokenizer, chat=chat)

    served = in_passing_thread(load)
    model = served.engine.model
    if compile is None and draft is None and model.device.type == "cpu":
        compile_in_background(model, max_batch, report)
    return served


def chat_or_reason(
    path: Path, tokenizer: Tokenizer, adapter: Path | None, chat_template: Path | None
) -> ChatFormat | str:
    """The served model's chat format, or the one-line reason it has none. A template file that is given
    but broken stops the server at start instead."""
    try:
        return open_chat(path, tokenizer, adapter, chat_template)
    except UserError as error:
        if chat_template is not None:
            raise
        return str(error)  # the engine's thread is then the only one with OpenMP workers


def load_served_adapters(
    base_name: str,
    base: Path,
    adapters: dict[str, Path],
    max_batch: int = 16,
    force_base: bool = False,
    chat_template: Path | None = None,
    context: int | None = None,
) -> dict[str, ServedModel]:
    """The base and each adapter as its own model name, on one copy of the base's weights and one engine,
    whose batches mix requests for all of them."""
    from llmctl.adapters import open_with_adapters

    def load() -> tuple[Engine, Tokenizer]:
        model, tokenizer, router = open_with_adapters(Path(base), adapters, force_base)
        limit_context(model, context)
        use_decode_kernels(model)
        return Engine(model, max_batch=max_batch, router=router).start(), tokenizer

    engine, tokenizer = in_passing_thread(load)
    chat = chat_or_reason(Path(base), tokenizer, None, chat_template)
    served = {base_name: ServedModel(base_name, Path(base), engine, tokenizer, chat)}
    for name, path in adapters.items():
        chat = chat_or_reason(Path(base), tokenizer, Path(path), chat_template)
        served[name] = ServedModel(name, Path(path), engine, tokenizer, chat, adapter=name)
    return served


class GenerationFailed(RuntimeError):
    """The engine could not finish this request (the others it serves are unaffected)."""


@dataclass
class Completion:
    """Filled in as the stream runs: what the caller reports as usage and finish reason."""

    prompt_tokens: int
    completion_tokens: int = 0
    finish_reason: str | None = None
    first_token_at: float | None = None
    tokens: list[int] = field(default_factory=list)  # what a fallback model continues from
    prompt_logprobs: list[TokenLogprob | None] | None = None  # with params.prompt_logprobs, after prefill


async def stream_completion(
    served: ServedModel,
    prompt_ids: list[int],
    params: SamplingParams,
    record: Completion,
    constraint: Constraint | None = None,
) -> AsyncIterator[TextChunk]:
    """Text deltas of one request (under `constraint`'s grammar, if given). Leaving the iterator early (a
    client disconnect) frees the engine slot."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def deliver(token: int | None, finish: str | None) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop is gone (shutdown): nobody is listening
            loop.call_soon_threadsafe(queue.put_nowait, (token, finish))

    request = served.engine.submit(prompt_ids, params, deliver, served.adapter, constraint)
    text = TextStream(served.tokenizer, prompt_ids, params.stop_token_ids, params.stop_strings)
    pending: list[TokenLogprob] = []  # log-probabilities of tokens whose text is not out yet
    received = 0
    try:
        while True:
            token, finish = await queue.get()
            record.prompt_logprobs = request.prompt_logprobs  # the prefill has run by the first event
            if token is not None:
                if params.logprobs is not None:
                    pending.append(request.logprobs[received])
                received += 1
                record.completion_tokens += 1
                record.tokens.append(token)
                if record.first_token_at is None:
                    record.first_token_at = time.perf_counter()
                started = time.perf_counter()
                chunk = text.push(token)
                served.stream_seconds["detokenize"] += time.perf_counter() - started
                if chunk.finish_reason or chunk.text:
                    chunk.logprobs, pending = pending, []
                if chunk.finish_reason:
                    record.finish_reason = chunk.finish_reason
                    yield chunk
                    return
                if chunk.text:
                    yield chunk
            if finish == "error":
                record.finish_reason = "error"
                raise GenerationFailed(request.error or "generation failed")
            if finish is not None:
                record.finish_reason = "stop" if finish == "stop" else "length"
                end = text.end(record.finish_reason)
                end.logprobs = pending
                yield end
                return
    finally:
        request.cancel()
