"""The OpenAI-compatible HTTP API: /v1/models, /v1/completions, /v1/chat/completions (with SSE streaming),
/health and Prometheus /metrics, over one or more served models and weighted aliases for A/B tests.

Handlers are module-level functions reading a typed `ServerState` from `app.state`; the wire format lives
in `api_schema`, one request's streaming in `api_call`.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmctl.errors import UserError
from llmctl.infer.ab_log import (
    RATINGS_PER_COMPLETION,
    CompletionLog,
    ForeignCompletion,
    LoggedRequest,
    RatedEnough,
    UnknownCompletion,
    choose_variant,
    user_digest,
)
from llmctl.infer.api_call import ApiCall, Prompt
from llmctl.infer.api_schema import (
    ChatRequest,
    CompletionRequest,
    Endpoint,
    FeedbackRequest,
    OpenAIError,
    Reply,
    SamplingFields,
)
from llmctl.infer.constraints import ConstraintError, ConstraintSpec
from llmctl.infer.decode import PromptTooLong, fit_prompt
from llmctl.infer.served import ServedModel
from llmctl.infer.server_metrics import ServerMetrics
from llmctl.infer.tokenizer_routes import add_tokenizer_routes
from llmctl.infer.tools import call_grammar, syntax_of

Routes = dict[str, list[tuple[str, float]]]
log = logging.getLogger("llmctl.server")
PROTECTED_PATHS = ("/v1/", "/docs", "/redoc", "/openapi.json", "/tokenize", "/detokenize", "/tokenizer_info")
USER_HEADER = "x-llmctl-user"  # the A/B user when the body names none
VARIANT_HEADER = "x-llmctl-variant"  # the model that served a request (a route's chosen variant)
MAX_BODY_BYTES = 4 << 20
# A token is at most this many characters (sentencepiece's default piece length is 16): a longer prompt cannot
# fit the context, and is refused before it is tokenized.
MAX_CHARS_PER_TOKEN = 64
MAX_CHOICES = 64  # prompts x candidates in one request; the admission limit counts each


class Admission:
    """The server's one admission limit: choices in flight, counted from the moment a request is accepted
    until its response has been sent (or its client has gone)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.in_flight = limit, 0

    def admit(self, choices: int) -> None:
        if self.in_flight + choices > self.limit:
            raise OpenAIError(
                429,
                f"server busy: {self.in_flight} requests in flight (limit {self.limit}); retry shortly",
                type_="rate_limit_error",
            )
        self.in_flight += choices

    def release(self, choices: int) -> None:
        self.in_flight -= choices


@dataclass
class ServerState:
    models: dict[str, ServedModel]
    routes: Routes
    api_key: str | None
    metrics: ServerMetrics
    admission: Admission
    ab_log: CompletionLog | None = None
    watchdog_seconds: float = 1.0
    fallbacks: dict[str, str] = field(default_factory=dict)  # alias (or model) -> the model that stands in

    def fallback_for(self, name: str, served: ServedModel) -> ServedModel | None:
        """The model that stands in for `name`'s choice `served`, if `name` has one other than it."""
        fallback = self.fallbacks.get(name)
        return None if fallback is None or fallback == served.name else self.models[fallback]

    def ready(self) -> bool:
        """Every alias has a variant or a fallback that can serve; every model outside the aliases can."""
        grouped: dict[str, list[str]] = {
            alias: [
                *(name for name, _ in variants),
                *([self.fallbacks[alias]] if alias in self.fallbacks else []),
            ]
            for alias, variants in self.routes.items()
        }
        grouped |= {
            name: [name, fallback] for name, fallback in self.fallbacks.items() if name in self.models
        }
        covered = {name for names in grouped.values() for name in names}
        grouped |= {name: [name] for name in self.models if name not in covered}
        return all(any(self.models[name].engine.alive() for name in names) for names in grouped.values())

    def resolve(self, name: str, user: str | None = None) -> ServedModel:
        """A model by name, or a variant of a weighted alias: the same one for every request of a user."""
        if name in self.routes:
            name = choose_variant(name, self.routes[name], user)
        if name not in self.models:
            known = ", ".join([*self.models, *self.routes])
            raise OpenAIError(
                404,
                f"model {name!r} is not served here (serving: {known})",
                param="model",
                code="model_not_found",
            )
        return self.models[name]


class AdmittedStream(StreamingResponse):
    """A streaming response that gives its admission back however the stream ends (done, error, hang-up)."""

    def __init__(
        self, content: AsyncIterator[str], admission: Admission, choices: int, headers: dict[str, str]
    ) -> None:
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self.admission, self.choices = admission, choices

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.admission.release(self.choices)


def state_of(request: Request) -> ServerState:
    return request.app.state.llmctl


async def watchdog(state: ServerState) -> None:
    """Restart an engine whose loop died; /health answers 503 until then."""
    while True:
        await asyncio.sleep(state.watchdog_seconds)
        for name, served in state.models.items():
            if served.engine.restart_if_dead():
                log.error(
                    "the engine of %s had stopped; restarted it (restart %d)", name, served.engine.restarts
                )


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    guard_task = asyncio.create_task(watchdog(app.state.llmctl))
    yield
    guard_task.cancel()
    for served in app.state.llmctl.models.values():  # uvicorn has drained in-flight requests by now
        served.engine.stop()
    if app.state.llmctl.ab_log is not None:
        app.state.llmctl.ab_log.close()


async def openai_error(request: Request, error: OpenAIError) -> JSONResponse:
    return error.response()


async def internal_error(request: Request, error: Exception) -> JSONResponse:
    """Whatever else went wrong (a bug): still OpenAI's shape, never a plain-text page; logged with its
    traceback by the server."""
    log.error("unhandled error in %s %s: %r", request.method, request.url.path, error)
    return OpenAIError(500, "internal server error", type_="server_error", code="internal_error").response()


async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    """Starlette's own errors (unparseable body, unknown path, wrong method) in OpenAI's shape too."""
    kind = "invalid_request_error" if error.status_code < 500 else "server_error"
    return OpenAIError(error.status_code, str(error.detail), type_=kind).response()


async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
    first = error.errors()[0]
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    message = first.get("msg", "invalid request")
    if first.get("type") == "json_invalid":  # its location is a byte offset, not a field
        offset = location[0] if location else "?"
        message, location = f"the request body is not valid JSON (at byte {offset})", []
    param = ".".join(location) or None
    return OpenAIError(400, f"{param + ': ' if param else ''}{message}", param=param).response()


DRAINED_BYTES = (
    64 << 20
)  # an oversized body up to this is read and dropped before the 413; a larger one is cut


async def _drain(receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect" or not message.get("more_body", False):
            return


class BodyLimit:
    """Reads a request body up to the limit before the app sees it, so an oversized body is a 413 whether
    it declares its length or arrives chunked, and nothing downstream ever buffers more."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            if (
                int(declared) <= DRAINED_BYTES
            ):  # read and dropped, so the client, still sending, can read the 413
                await _drain(receive)
            await self._refuse(int(declared), scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                await self._refuse(size, scope, receive, send, at_least=True)
                return
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: the client's hang-up, which streams watch for
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, size: int, scope, receive, send, at_least: bool = False) -> None:
        message = (
            f"request body of {'more than ' if at_least else ''}{size:,} bytes exceeds the server's limit "
            f"of {self.limit:,}"
        )
        await OpenAIError(413, message, code="request_too_large").response()(scope, receive, send)


async def guard(request: Request, call_next):
    """When a key is set, refuse requests without it (401) before any work."""
    state = state_of(request)
    if state.api_key and request.url.path.startswith(PROTECTED_PATHS):
        offered = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(offered, f"Bearer {state.api_key}".encode()):  # constant time
            return OpenAIError(401, "invalid or missing API key", code="invalid_api_key").response()
    return await call_next(request)


async def health(request: Request) -> JSONResponse:
    models = state_of(request).models
    status = {
        name: {
            "active": m.engine.active(),
            "queued": m.engine.queue_depth(),
            "alive": m.engine.alive(),
            "restarts": m.engine.restarts,
        }
        for name, m in models.items()
    }
    ready = state_of(request).ready()
    return JSONResponse(
        {"status": "ok" if ready else "engine stopped", "models": status}, status_code=200 if ready else 503
    )


async def prometheus(request: Request) -> PlainTextResponse:
    return PlainTextResponse(state_of(request).metrics.render(), media_type="text/plain; version=0.0.4")


async def list_models(request: Request) -> dict:
    state = state_of(request)
    data = [
        {"id": name, "object": "model", "created": m.created, "owned_by": "llmctl"}
        for name, m in state.models.items()
    ]
    now = int(time.time())
    data += [{"id": alias, "object": "model", "created": now, "owned_by": "llmctl"} for alias in state.routes]
    return {"object": "list", "data": data}


def request_user(body: SamplingFields, request: Request) -> str | None:
    return body.user or request.headers.get(USER_HEADER)


async def completions(body: CompletionRequest, request: Request):
    served = state_of(request).resolve(body.model, request_user(body, request))
    prompts = [await completion_prompt(served, prompt) for prompt in body.prompts()]
    stop_ids = (served.tokenizer.eos_id,)
    reply, constraint = body.reply(), body.constraint()
    return await respond(request, served, body, Endpoint.COMPLETION, prompts, stop_ids, reply, constraint)


async def completion_prompt(served: ServedModel, prompt: str | list[int]) -> Prompt:
    """A prompt given as text, or as token ids of the model's vocabulary."""
    if not prompt:
        raise OpenAIError(400, "prompt is empty", param="prompt")
    if isinstance(prompt, str):
        return Prompt(await tokenize(served, prompt, Endpoint.COMPLETION), prompt)
    vocab = served.engine.model.config.vocab_size
    outside = next((token for token in prompt if not 0 <= token < vocab), None)
    if outside is not None:
        raise OpenAIError(
            400, f"prompt: token id {outside} is outside the vocabulary (0..{vocab - 1})", param="prompt"
        )
    return Prompt(list(prompt), served.tokenizer.decode(list(prompt)))


async def chat_completions(body: ChatRequest, request: Request):
    served = state_of(request).resolve(body.model, request_user(body, request))
    if isinstance(served.chat, str):
        raise OpenAIError(
            400,
            f"model {served.name!r} cannot render a chat: {served.chat}; or use /v1/completions",
            param="messages",
            code="chat_template_unavailable",
        )
    messages = [m.message() for m in body.messages]
    check_unicode(" ".join(message.content for message in messages), Endpoint.CHAT)
    tools = body.functions()
    if (tools or any(m.role == "tool" or m.tool_calls for m in messages)) and not served.chat.takes_tools:
        raise OpenAIError(
            400,
            f"the chat template of model {served.name!r} takes no tools (it never reads `tools`); call it "
            "without tools, or serve it with --chat-template FILE naming a template that does",
            param="tools",
            code="tools_unsupported",
        )
    try:
        text = served.chat.render(messages, tools=tools or None)
    except UserError as error:  # the template's raise_exception: an order of roles it does not take, say
        raise OpenAIError(400, str(error), param="messages", code="chat_template_error") from None
    prompt = Prompt(await tokenize(served, text, Endpoint.CHAT), text)
    reply, constraint, forced = body.reply(), body.constraint(), body.forced_functions()
    if tools:
        syntax = syntax_of(served.chat.source)
        if forced and constraint is not None:
            raise OpenAIError(
                400,
                "tool_choice that forces a call does not combine with response_format",
                param="tool_choice",
            )
        if forced:
            constraint = call_grammar(forced, syntax, several=body.parallel_tool_calls)
        if body.parses_tool_calls():
            names = frozenset(tool["function"]["name"] for tool in tools)
            reply = replace(reply, tool_syntax=syntax, tool_names=names)
    stop_ids = served.chat.stop_ids
    return await respond(request, served, body, Endpoint.CHAT, [prompt], stop_ids, reply, constraint)


async def tokenize(served: ServedModel, text: str, endpoint: Endpoint) -> list[int]:
    """Token ids of a prompt, computed off the event loop so a long prompt never stalls other streams."""
    check_unicode(text, endpoint)
    if len(text) > MAX_CHARS_PER_TOKEN * served.context:
        raise OpenAIError(
            400,
            f"the prompt has {len(text):,} characters, more than a {served.context}-token context can hold",
            param=endpoint.prompt_param,
            code="context_length_exceeded",
        )
    return await asyncio.to_thread(served.tokenizer.encode, text)


def can_take(served: ServedModel) -> bool:
    """Whether a model should take a new request rather than its fallback: its engine loop runs and it has
    not a full batch of requests already waiting (its admission limit: more would only queue)."""
    engine = served.engine
    return engine.alive() and engine.queue_depth() < engine.max_batch


def check_constraint(served: ServedModel, spec: ConstraintSpec) -> None:
    """A structured output the model can serve, or a 400 naming what is refused (a schema keyword the engine
    does not implement, a malformed regex or grammar), before anything is generated."""
    param = "response_format" if spec.kind in ("json_object", "json_schema") else "structured_outputs"
    try:
        served.constraints.compile(spec)
    except ConstraintError as error:
        raise OpenAIError(
            400, f"unsupported {param}: {error}", param=param, code="unsupported_constraint"
        ) from None


def check_unicode(text: str, endpoint: Endpoint) -> None:
    """Text no tokenizer or template can take (a lone UTF-16 surrogate, which JSON's \\ud800 escapes can
    carry) is a 400."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise OpenAIError(
            400,
            f"{endpoint.prompt_param} contains an unpaired UTF-16 surrogate "
            f"(U+{ord(text[error.start]):04X}); send valid Unicode text",
            param=endpoint.prompt_param,
            code="invalid_unicode",
        ) from None


async def respond(
    request: Request,
    served: ServedModel,
    body: CompletionRequest | ChatRequest,
    endpoint: Endpoint,
    prompts: list[Prompt],
    stop_ids: tuple[int, ...],
    reply: Reply,
    constraint: ConstraintSpec | None,
):
    state = state_of(request)
    body.check_supported()
    choices = len(prompts) * body.candidates()
    if choices > MAX_CHOICES:
        raise OpenAIError(
            400, f"{choices} generations asked (prompts x n or best_of); at most {MAX_CHOICES}", param="n"
        )
    longest = max((prompt.ids for prompt in prompts), key=len)
    max_new_tokens = generation_budget(served, longest, body, endpoint)
    logged = None
    if state.ab_log is not None:
        user = request_user(body, request)
        text = "\n".join(prompt.text for prompt in prompts)
        logged = LoggedRequest(state.ab_log, body.model, user_digest(user) if user else None, text)
    params = body.sampling_params(max_new_tokens, stop_ids, served.engine.model.config.vocab_size)
    if constraint is not None:
        check_constraint(served, constraint)
    fallback = state.fallback_for(body.model, served)
    if fallback is not None and not can_take(served):  # the fallback serves it all
        state.metrics.fallbacks.labels(body.model, served.name, fallback.name).inc()
        served, fallback = fallback, None
    call = ApiCall(
        served,
        endpoint,
        prompts,
        params,
        state.metrics,
        logged,
        constraint,
        fallback,
        body.model,
        reply,
    )
    headers = {VARIANT_HEADER: served.name}
    try:
        state.admission.admit(choices)
    except OpenAIError:
        state.metrics.rejected(served.name)
        raise
    if body.stream:
        return AdmittedStream(call.sse(body.include_usage), state.admission, choices, headers)
    try:
        return JSONResponse(await call.complete(), headers=headers)
    finally:
        state.admission.release(choices)


async def feedback(body: FeedbackRequest, request: Request) -> dict:
    """A score for a served completion, appended to the A/B log beside it."""
    log = state_of(request).ab_log
    if log is None:
        raise OpenAIError(404, "feedback needs a completion log: start llmctl serve with --ab-log FILE")
    score = body.value()
    user = body.user or request.headers.get(USER_HEADER)
    try:
        variant = log.feedback(body.id, score, user_digest(user) if user else None)
    except UnknownCompletion:
        raise OpenAIError(
            404,
            f"no completion {body.id!r} was served here (or it is older than the log remembers)",
            param="id",
        ) from None
    except ForeignCompletion:
        raise OpenAIError(
            403,
            f"completion {body.id!r} was served to another user; rate it as that user (user or {USER_HEADER})",
            type_="permission_error",
            param="user",
        ) from None
    except RatedEnough:
        raise OpenAIError(
            429,
            f"completion {body.id!r} has been rated {RATINGS_PER_COMPLETION} times already; the latest counts",
            type_="rate_limit_error",
            param="id",
        ) from None
    return {"id": body.id, "object": "feedback", "variant": variant, "score": score}


def generation_budget(
    served: ServedModel, prompt_ids: list[int], body: SamplingFields, endpoint: Endpoint
) -> int:
    """max_tokens, or all the room the prompt leaves; a 400 when the prompt or max_tokens do not fit."""
    try:
        fit_prompt(prompt_ids, served.context)
    except PromptTooLong as error:
        raise OpenAIError(
            400, str(error), param=endpoint.prompt_param, code="context_length_exceeded"
        ) from None
    room = served.context - len(prompt_ids)
    requested = body.requested_tokens()
    if requested is not None and requested > room:
        raise OpenAIError(
            400,
            f"max_tokens is {requested} but the prompt ({len(prompt_ids)} tokens) leaves {room} of the "
            f"{served.context}-token context",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return room if requested is None else requested


def create_app(
    models: dict[str, ServedModel],
    routes: Routes | None = None,
    api_key: str | None = None,
    max_concurrency: int = 64,
    max_body_bytes: int = MAX_BODY_BYTES,
    ab_log: CompletionLog | None = None,
    fallbacks: dict[str, str] | None = None,
) -> FastAPI:
    """The OpenAI-compatible app over `models`; `routes` are weighted aliases, `fallbacks` name the model that
    serves an alias's (or a model's) requests when its own fails them."""
    app = FastAPI(title="llmctl", lifespan=lifespan)
    app.state.llmctl = ServerState(
        models,
        routes or {},
        api_key,
        ServerMetrics(models),
        Admission(max_concurrency),
        ab_log,
        fallbacks=fallbacks or {},
    )
    app.add_exception_handler(OpenAIError, openai_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)
    app.middleware("http")(guard)
    app.add_middleware(BodyLimit, limit=max_body_bytes)  # outermost: no layer reads an unbounded body
    app.get("/health")(health)
    app.get("/metrics")(prometheus)
    app.get("/v1/models")(list_models)
    app.post("/v1/completions")(completions)
    app.post("/v1/chat/completions")(chat_completions)
    app.post("/v1/feedback")(feedback)
    add_tokenizer_routes(app)
    return app
