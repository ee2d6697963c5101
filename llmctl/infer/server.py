"""The OpenAI-compatible HTTP API: /v1/models, /v1/completions, /v1/chat/completions (with SSE streaming),
/health and Prometheus /metrics, over one or more served models and weighted aliases for A/B tests."""

from __future__ import annotations

import json
import random
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from llmctl.data.chat import Message, render_chat
from llmctl.infer.generate import PromptTooLong, fit_prompt
from llmctl.infer.sampling import SamplingParams
from llmctl.infer.served import Completion, ServedModel, stream_completion
from llmctl.infer.server_metrics import ServerMetrics

UNSUPPORTED = ("logprobs", "top_logprobs", "echo", "best_of", "logit_bias", "tools", "functions", "suffix")


class OpenAIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """Fields shared by both endpoints; unknown fields are ignored, as OpenAI-compatible servers do."""

    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0)


class CompletionRequest(SamplingFields):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


def create_app(
    models: dict[str, ServedModel],
    routes: dict[str, list[tuple[str, float]]] | None = None,
    api_key: str | None = None,
    max_concurrency: int = 64,
) -> FastAPI:
    routes = routes or {}
    metrics = ServerMetrics(models)
    in_flight = {"count": 0}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        for served in models.values():  # uvicorn has drained in-flight requests by now
            served.engine.stop()

    app = FastAPI(title="llmctl", lifespan=lifespan)

    @app.exception_handler(OpenAIError)
    async def openai_error(request: Request, error: OpenAIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        location = [str(part) for part in first.get("loc", ()) if part != "body"]
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            message = "the request body is not valid JSON"
        param = ".".join(location) or None
        return OpenAIError(400, f"{param + ': ' if param else ''}{message}", param=param).response()

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        authorized = request.headers.get("authorization", "") == f"Bearer {api_key}"
        if api_key and request.url.path.startswith("/v1/") and not authorized:
            return OpenAIError(401, "invalid or missing API key", code="invalid_api_key").response()
        return await call_next(request)

    def resolve(name: str) -> ServedModel:
        if name in routes:
            targets, weights = zip(*routes[name], strict=True)
            name = random.choices(targets, weights=weights)[0]
        if name not in models:
            known = ", ".join([*models, *routes])
            raise OpenAIError(
                404,
                f"model {name!r} is not served here (serving: {known})",
                param="model",
                code="model_not_found",
            )
        return models[name]

    @app.get("/health")
    async def health() -> dict:
        return {
            "status": "ok",
            "models": {
                name: {"active": m.engine.active(), "queued": m.engine.queue_depth()}
                for name, m in models.items()
            },
        }

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def list_models() -> dict:
        data = [
            {"id": name, "object": "model", "created": m.created, "owned_by": "llmctl"}
            for name, m in models.items()
        ]
        data += [
            {"id": alias, "object": "model", "created": int(time.time()), "owned_by": "llmctl"}
            for alias in routes
        ]
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        served = resolve(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise OpenAIError(400, "only one prompt per request is supported", param="prompt")
        prompt_ids = served.tokenizer.encode(prompts[0])
        return await respond(
            served, body, prompt_ids, body.max_tokens, (served.tokenizer.eos_id,), "text_completion", "prompt"
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        served = resolve(body.model)
        text = render_chat([Message(m.role, m.content) for m in body.messages])
        prompt_ids = served.tokenizer.encode(text)
        max_tokens = body.max_completion_tokens or body.max_tokens
        return await respond(
            served, body, prompt_ids, max_tokens, served.chat_stop_ids(), "chat.completion", "messages"
        )

    async def respond(served, body, prompt_ids, max_tokens, stop_ids, kind, prompt_param):
        for name in UNSUPPORTED:
            if (body.model_extra or {}).get(name) not in (None, False, 0):
                raise OpenAIError(400, f"{name} is not supported by this server", param=name)
        try:
            fit_prompt(prompt_ids, served.context)
        except PromptTooLong as error:
            raise OpenAIError(400, str(error), param=prompt_param, code="context_length_exceeded") from None
        room = served.context - len(prompt_ids)
        if max_tokens is not None and max_tokens > room:
            raise OpenAIError(
                400,
                f"max_tokens is {max_tokens} but the prompt ({len(prompt_ids)} tokens) leaves {room} of the "
                f"{served.context}-token context",
                param="max_tokens",
                code="context_length_exceeded",
            )
        if in_flight["count"] + body.n > max_concurrency:
            metrics.rejected(served.name)
            raise OpenAIError(
                429,
                f"server busy: {in_flight['count']} requests in flight (limit {max_concurrency})",
                type_="rate_limit_error",
            )
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        params = [
            SamplingParams(
                max_new_tokens=max_tokens or room,
                temperature=body.temperature,
                top_p=body.top_p,
                top_k=body.top_k,
                min_p=body.min_p,
                presence_penalty=body.presence_penalty,
                frequency_penalty=body.frequency_penalty,
                repetition_penalty=body.repetition_penalty,
                stop_token_ids=stop_ids,
                seed=None if body.seed is None else body.seed + index,
            )
            for index in range(body.n)
        ]
        call = Call(served, kind, prompt_ids, params, stops, metrics, in_flight)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(call.sse(include_usage), media_type="text/event-stream")
        return await call.complete()

    return app


class Call:
    """One API request: n engine requests whose streams are merged, counted and shaped for the wire."""

    def __init__(self, served, kind, prompt_ids, params, stops, metrics, in_flight) -> None:
        self.served, self.kind, self.prompt_ids, self.params, self.stops = (
            served,
            kind,
            prompt_ids,
            params,
            stops,
        )
        self.metrics, self.in_flight = metrics, in_flight
        self.id = ("chatcmpl-" if kind == "chat.completion" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.records = [Completion(prompt_tokens=len(prompt_ids)) for _ in params]
        self.started = time.perf_counter()

    def usage(self) -> dict:
        completion = sum(r.completion_tokens for r in self.records)
        return {
            "prompt_tokens": len(self.prompt_ids),
            "completion_tokens": completion,
            "total_tokens": len(self.prompt_ids) + completion,
        }

    async def events(self) -> AsyncIterator[tuple[int, str, str | None]]:
        """(choice index, text delta, finish reason) from every choice, as they come."""
        import asyncio

        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int) -> None:
            try:
                async for chunk in stream_completion(
                    self.served, self.prompt_ids, self.params[index], self.stops, self.records[index]
                ):
                    await queue.put((index, chunk.text, chunk.finish_reason))
            except Exception as error:  # surface engine failures to the caller instead of hanging
                await queue.put(error)
            finally:
                await queue.put(None)

        self.in_flight["count"] += len(self.params)
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
            self.in_flight["count"] -= len(self.params)
            self.metrics.finished(
                self.served.name, self.kind, self.records, time.perf_counter() - self.started, self.started
            )

    def choice(self, index: int, text: str | None, finish: str | None, stream: bool) -> dict:
        if self.kind == "chat.completion":
            key = "delta" if stream else "message"
            content = {"content": text} if text is not None else {}
            return {
                "index": index,
                key: {"role": "assistant", **content} if not stream else content,
                "finish_reason": finish,
                "logprobs": None,
            }
        return {"index": index, "text": text or "", "finish_reason": finish, "logprobs": None}

    async def complete(self) -> dict:
        texts = [""] * len(self.params)
        finishes: list[str | None] = [None] * len(self.params)
        async for index, text, finish in self.events():
            texts[index] += text
            finishes[index] = finish or finishes[index]
        choices = [self.choice(i, texts[i], finishes[i], stream=False) for i in range(len(self.params))]
        return {
            "id": self.id,
            "object": self.kind,
            "created": self.created,
            "model": self.served.name,
            "choices": choices,
            "usage": self.usage(),
        }

    async def sse(self, include_usage: bool) -> AsyncIterator[str]:
        kind = self.kind + ".chunk" if self.kind == "chat.completion" else self.kind
        base = {"id": self.id, "object": kind, "created": self.created, "model": self.served.name}
        if self.kind == "chat.completion":
            for index in range(len(self.params)):
                first = {
                    "index": index,
                    "delta": {"role": "assistant", "content": ""},
                    "finish_reason": None,
                    "logprobs": None,
                }
                yield _sse({**base, "choices": [first]})
        async for index, text, finish in self.events():
            if text or finish:
                yield _sse({**base, "choices": [self.choice(index, text, finish, stream=True)]})
        if include_usage:
            yield _sse({**base, "choices": [], "usage": self.usage()})
        yield "data: [DONE]\n\n"


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"
