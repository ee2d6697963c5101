"""One API request: its choices (n per prompt, or best_of candidates of which n are kept) run as engine
requests whose text streams are merged, counted and shaped into an OpenAI response body or server-sent
events, with the prompt echoed and log-probabilities where asked."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

from llmctl.infer.ab_log import LoggedRequest
from llmctl.infer.api_logprobs import LogprobWriter
from llmctl.infer.api_schema import Endpoint, OpenAIError, Reply
from llmctl.infer.constraints import Constraint, ConstraintSpec
from llmctl.infer.logprobs import TokenLogprob
from llmctl.infer.sampling import SamplingParams
from llmctl.infer.served import Completion, GenerationFailed, ServedModel, stream_completion
from llmctl.infer.server_metrics import ServerMetrics
from llmctl.infer.text import TextChunk
from llmctl.infer.tools import ToolCall, may_become_call, parse_tool_calls

# (candidate index, its next chunk)
ChoiceEvent = tuple[int, TextChunk]


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    text: str


class ApiCall:
    def __init__(
        self,
        served: ServedModel,
        endpoint: Endpoint,
        prompts: list[Prompt],
        params: list[SamplingParams],
        metrics: ServerMetrics,
        logged: LoggedRequest | None = None,
        constraint: ConstraintSpec | None = None,
        fallback: ServedModel | None = None,
        alias: str | None = None,
        reply: Reply = Reply(),
    ) -> None:
        # candidate i generates for prompts[i // per_prompt] with params[i % per_prompt]
        self.served, self.endpoint, self.prompts, self.reply = served, endpoint, prompts, reply
        self.per_prompt = len(params)
        self.params = [candidate for _ in prompts for candidate in params]
        self.constraint = constraint  # compiled anew for each choice: a grammar's state is per generation
        # `serve --fallback ALIAS=MODEL`: a choice whose generation fails goes on there, from where it stopped
        self.fallback, self.alias = fallback, alias
        self.metrics = metrics
        self.logged = logged  # with `serve --ab-log`: every request is recorded
        self.id = endpoint.id_prefix + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.records = [Completion(prompt_tokens=len(self.prompt_of(i).ids)) for i in range(len(self.params))]
        self.texts = [""] * len(self.params)
        self.logprobs: list[list[TokenLogprob | None]] = [[] for _ in self.params]
        self.failed = False
        self.started = time.perf_counter()
        self.shown_as_content: set[int] = set()  # streamed choices whose text turned out to be no tool call

    def prompt_of(self, index: int) -> Prompt:
        return self.prompts[index // self.per_prompt]

    @property
    def prompt_tokens(self) -> int:
        return sum(len(prompt.ids) for prompt in self.prompts)

    def usage(self) -> dict:
        completion = sum(r.completion_tokens for r in self.records)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        }

    async def events(self) -> AsyncIterator[ChoiceEvent]:
        """Text deltas of every candidate, as they come."""
        choices = self._single() if len(self.params) == 1 else self._merged()
        try:
            async with contextlib.aclosing(choices):
                async for index, chunk in choices:
                    self.texts[index] += chunk.text
                    self.logprobs[index] += chunk.logprobs
                    yield index, chunk
        except Exception:  # an engine failure (a disconnect cancels, which is not one)
            self.failed = True
            raise
        finally:
            seconds = time.perf_counter() - self.started
            self.metrics.finished(
                self.served.name, self.endpoint, self.records, seconds, self.started, self.failed
            )
            if self.logged is not None:
                self._log(self.logged, seconds)

    async def _single(self) -> AsyncIterator[ChoiceEvent]:
        """One choice streams straight through: no merging task and queue, two task switches a token fewer."""
        async for chunk in self._stream(0):
            yield 0, chunk

    async def _stream(self, index: int) -> AsyncIterator[TextChunk]:
        """A choice's text; if its model fails it (a dead engine loop, a failed step) and the alias has a
        fallback, the rest comes from the fallback, continuing from the tokens already sent."""
        served, params, record = self.served, self.params[index], self.records[index]
        prompt_ids = self.prompt_of(index).ids
        try:
            async for chunk in stream_completion(
                served, prompt_ids, params, record, self._constraint(served)
            ):
                yield chunk
            return
        except GenerationFailed:
            if self.fallback is None or self.fallback is served:
                raise
        fallback, produced = self.fallback, list(record.tokens)
        self.metrics.fallbacks.labels(self.alias, served.name, fallback.name).inc()
        self.served = fallback  # the response names the model that finished it
        rest = replace(params, max_new_tokens=params.max_new_tokens - len(produced))
        if rest.max_new_tokens <= 0:
            record.finish_reason = "length"
            yield TextChunk("", None, "length")
            return
        constraint = self._constraint(fallback, produced)
        async for chunk in stream_completion(fallback, [*prompt_ids, *produced], rest, record, constraint):
            yield chunk

    def _constraint(
        self, served: ServedModel, produced: tuple[int, ...] | list[int] = ()
    ) -> Constraint | None:
        """The choice's grammar for `served`'s vocabulary, advanced over what was already generated."""
        if self.constraint is None:
            return None
        constraint = served.constraints.compile(self.constraint)
        for token in produced:
            constraint.advance(token, self.params[0].stop_token_ids)
        return constraint

    async def _merged(self) -> AsyncIterator[ChoiceEvent]:
        """Several choices, each pumped by its own task into one queue, in the order their tokens come."""
        queue: asyncio.Queue[ChoiceEvent | Exception | None] = asyncio.Queue()

        async def pump(index: int) -> None:
            try:
                async for chunk in self._stream(index):
                    await queue.put((index, chunk))
            except Exception as error:  # surface engine failures to the caller instead of hanging
                await queue.put(error)
            finally:
                await queue.put(None)

        tasks = [asyncio.create_task(pump(index)) for index in range(len(self.params))]
        try:
            remaining = len(tasks)
            while remaining:
                item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield item
        finally:
            for task in tasks:
                task.cancel()

    def _log(self, logged: LoggedRequest, seconds: float) -> None:
        first = [r.first_token_at - self.started for r in self.records if r.first_token_at is not None]
        record = {
            "id": self.id,
            "alias": logged.alias,
            "user": logged.user,
            "variant": self.served.name,
            "endpoint": self.endpoint.value,
            "latency_seconds": round(seconds, 6),
            "first_token_seconds": round(min(first), 6) if first else None,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": sum(r.completion_tokens for r in self.records),
            "finish_reasons": [
                r.finish_reason or ("error" if self.failed else "cancelled") for r in self.records
            ],
        }
        logged.log.completion(record, logged.prompt, self.texts)

    def kept(self) -> list[int]:
        """The candidates the response shows, in order: per prompt, all of them, or where best_of ran more
        than n, the n whose tokens have the highest mean log-probability."""
        kept = []
        for first in range(0, len(self.params), self.per_prompt):
            candidates = list(range(first, first + self.per_prompt))
            if self.per_prompt > self.reply.n:
                candidates = sorted(candidates, key=self._mean_logprob, reverse=True)[: self.reply.n]
            kept += candidates
        return kept

    def _mean_logprob(self, index: int) -> float:
        values = [entry.logprob for entry in self.logprobs[index] if entry is not None]
        return sum(values) / len(values) if values else float("-inf")

    def writer(self, index: int) -> LogprobWriter:
        """Log-probabilities of candidate `index` from its first token shown: the prompt's, with echo."""
        ids = self.prompt_of(index).ids
        before = None if self.reply.echo else ids[-1]
        return LogprobWriter(self.served.tokenizer, self.endpoint, before)

    def echoed(self, index: int) -> tuple[str, list[TokenLogprob | None], list[int]]:
        """The prompt in front of a candidate's text: (text, log-probabilities, ids); empty without echo."""
        if not self.reply.echo:
            return "", [], []
        prompt = self.prompt_of(index)
        return prompt.text, self.records[index].prompt_logprobs or [None] * len(prompt.ids), prompt.ids

    def choice(
        self,
        index: int,
        text: str | None,
        finish: str | None,
        stream: bool,
        logprobs: dict | None = None,
        tool_calls: list[dict] | None = None,
    ) -> dict:
        if self.endpoint is Endpoint.COMPLETION:
            return {"index": index, "text": text or "", "finish_reason": finish, "logprobs": logprobs}
        content = {"content": text} if text is not None else {}
        if tool_calls:
            content = {"content": text or None, "tool_calls": tool_calls}
        message = content if stream else {"role": "assistant", **content}
        return {
            "index": index,
            "delta" if stream else "message": message,
            "finish_reason": finish,
            "logprobs": logprobs,
        }

    async def complete(self) -> dict:
        finishes: list[str | None] = [None] * len(self.params)
        try:
            async for index, chunk in self.events():
                finishes[index] = chunk.finish_reason or finishes[index]
        except GenerationFailed as error:
            raise generation_error(error) from None
        choices = []
        for position, index in enumerate(self.kept()):
            prompt_text, prompt_logprobs, prompt_ids = self.echoed(index)
            logprobs = None
            if self.reply.logprobs:
                entries = [*prompt_logprobs, *self.logprobs[index]]
                tokens = [*prompt_ids, *(entry.token for entry in self.logprobs[index])]
                logprobs = self.writer(index).write(entries, tokens)
            text, finish, calls = prompt_text + self.texts[index], finishes[index], []
            if self.reply.tool_syntax is not None:
                content, calls = parse_tool_calls(text, self.reply.tool_syntax, self.reply.tool_names)
                text, finish = (content, "tool_calls") if calls else (text, finish)
            wired = [call.wire() for call in calls]
            choices.append(self.choice(position, text, finish, False, logprobs, wired))
        return {
            "id": self.id,
            "object": self.endpoint.value,
            "created": self.created,
            "model": self.served.name,
            "choices": choices,
            "usage": self.usage(),
        }

    async def sse(self, include_usage: bool) -> AsyncIterator[str]:
        """Server-sent events; best_of is never streamed (the request refuses it), so every candidate shows."""
        base = {
            "id": self.id,
            "object": self.endpoint.chunk_object,
            "created": self.created,
            "model": self.served.name,
        }
        if self.endpoint is Endpoint.CHAT:  # OpenAI opens each chat choice with the role
            for index in range(len(self.params)):
                first = {
                    "index": index,
                    "delta": {"role": "assistant", "content": ""},
                    "finish_reason": None,
                    "logprobs": None,
                }
                yield _sse({**base, "choices": [first]}, self.served)
        writers: dict[int, LogprobWriter] = {}
        held: dict[int, TextChunk] = {}
        try:
            async for index, event in self.events():
                if index not in writers:  # its first event: the prompt has been prefilled
                    writers[index] = self.writer(index)
                    text, entries, ids = self.echoed(index)
                    if text:
                        logprobs = writers[index].write(entries, ids) if self.reply.logprobs else None
                        yield self._chunk(base, self.choice(index, text, None, True, logprobs))
                chunk, calls = self._release(index, event, held)
                if chunk is not None and (chunk.text or chunk.finish_reason):
                    logprobs = None
                    if self.reply.logprobs:
                        tokens = [entry.token for entry in chunk.logprobs if entry is not None]
                        logprobs = writers[index].write(chunk.logprobs, tokens)
                    wired = [call.wire(position) for position, call in enumerate(calls)]
                    text = chunk.text or (None if calls else "")
                    choice = self.choice(index, text, chunk.finish_reason, True, logprobs, wired)
                    yield self._chunk(base, choice)
        except GenerationFailed as error:  # the stream ends with an error event, never silently
            yield _sse(generation_error(error).body(), self.served)
            yield "data: [DONE]\n\n"
            return
        if include_usage:
            yield _sse({**base, "model": self.served.name, "choices": [], "usage": self.usage()}, self.served)
        yield "data: [DONE]\n\n"

    def _release(
        self, index: int, chunk: TextChunk, held: dict[int, TextChunk]
    ) -> tuple[TextChunk | None, list[ToolCall]]:
        """Where tool calls are parsed: text is held back while it may still become a call (None), shown
        once it cannot, and at the end read for the calls it makes."""
        syntax = self.reply.tool_syntax
        if syntax is None or index in self.shown_as_content:
            return chunk, []
        hold = held.setdefault(index, TextChunk("", None))
        hold.text += chunk.text
        hold.logprobs = [*hold.logprobs, *chunk.logprobs]
        if not chunk.finish_reason:
            if may_become_call(hold.text, syntax):
                return None, []
            self.shown_as_content.add(index)
            return held.pop(index), []
        del held[index]
        content, calls = parse_tool_calls(hold.text, syntax, self.reply.tool_names)
        if not calls:
            return TextChunk(hold.text, None, chunk.finish_reason, hold.logprobs), []
        return TextChunk(content or "", None, "tool_calls", hold.logprobs), calls

    def _chunk(self, base: dict, choice: dict) -> str:
        return _sse({**base, "model": self.served.name, "choices": [choice]}, self.served)


def generation_error(error: GenerationFailed) -> OpenAIError:
    return OpenAIError(500, f"generation failed: {error}", type_="server_error", code="generation_failed")


def _sse(payload: dict, served: ServedModel) -> str:
    started = time.perf_counter()
    event = f"data: {json.dumps(payload)}\n\n"
    served.stream_seconds["encode"] += time.perf_counter() - started
    return event
