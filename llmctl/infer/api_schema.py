"""The OpenAI wire format: request bodies, errors, the two endpoints, and a request's `SamplingParams`."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt

from llmctl.data.chat import Message
from llmctl.infer.constraints import ConstraintSpec
from llmctl.infer.sampling import SamplingParams
from llmctl.infer.tools import ToolSyntax

MAX_SEED = 2**63 - 1 - 16  # choice i of n uses seed + i; torch takes 64-bit seeds
# fields that would change what is generated and are not supported: a 400 naming them, never dropped
UNSUPPORTED = ("functions", "function_call", "suffix", "audio", "prediction", "web_search_options")
MAX_TOP_LOGPROBS = 20  # alternatives reported per token (OpenAI: 20 on chat, 5 on completions)


@dataclass(frozen=True)
class Reply:
    """What the response shows of the candidates: the n kept per prompt (the best by mean token
    log-probability where best_of ran more), with the prompt in front (echo) and log-probabilities."""

    n: int = 1
    echo: bool = False
    logprobs: bool = False
    tool_syntax: ToolSyntax | None = None  # where the text is read for the model's tool calls
    tool_names: frozenset[str] = frozenset()


class OpenAIError(Exception):
    """An error answered in OpenAI's shape: {"error": {message, type, param, code}}."""

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

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


class Endpoint(StrEnum):
    """The two generation endpoints; the value is the response's `object`."""

    COMPLETION = "text_completion"
    CHAT = "chat.completion"

    @property
    def id_prefix(self) -> str:
        return "chatcmpl-" if self is Endpoint.CHAT else "cmpl-"

    @property
    def chunk_object(self) -> str:
        return "chat.completion.chunk" if self is Endpoint.CHAT else "text_completion"

    @property
    def prompt_param(self) -> str:
        return "messages" if self is Endpoint.CHAT else "prompt"


class StreamOptions(BaseModel):
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    name: str = Field("response", max_length=64)
    description: str | None = None
    schema_: dict | bool = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's response_format: free text, any JSON object, or JSON matching a schema."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs` body field: exactly one of a JSON schema, a regular expression, a choice
    among strings, a Lark or GBNF grammar, or any JSON object."""

    model_config = ConfigDict(extra="forbid")
    json_: dict | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class SamplingFields(BaseModel):
    """Fields shared by both endpoints; unknown fields are ignored, as OpenAI-compatible servers do."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
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
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    user: str | None = Field(None, max_length=256)  # OpenAI's end-user id: keeps an A/B user on one variant
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias from -100 to 100

    def check_supported(self) -> None:
        extra = self.model_extra or {}
        for name in UNSUPPORTED:
            if extra.get(name) not in (None, False, 0):
                raise OpenAIError(400, f"{name} is not supported by this server", param=name)
        if extra.get("modalities") not in (None, ["text"]):
            raise OpenAIError(
                400, 'only text output is supported here (modalities: ["text"])', param="modalities"
            )

    def constraint(self) -> ConstraintSpec | None:
        """What response_format or structured_outputs asks the output to be, or None for free text."""
        specs = []
        if self.response_format is not None and self.response_format.type == "json_object":
            specs.append(ConstraintSpec("json_object"))
        if self.response_format is not None and self.response_format.type == "json_schema":
            if self.response_format.json_schema is None:
                raise OpenAIError(
                    400, "response_format json_schema needs its json_schema", param="response_format"
                )
            specs.append(ConstraintSpec("json_schema", self.response_format.json_schema.schema_))
        if self.structured_outputs is not None:
            asked = self.structured_outputs
            given = [
                ConstraintSpec(kind, value)
                for kind, value in (
                    ("json_schema", asked.json_),
                    ("regex", asked.regex),
                    ("choice", asked.choice),
                    ("grammar", asked.grammar),
                    ("json_object", True if asked.json_object else None),
                )
                if value is not None
            ]
            if len(given) != 1:
                raise OpenAIError(
                    400,
                    "structured_outputs takes exactly one of json, regex, choice, grammar, json_object",
                    param="structured_outputs",
                )
            specs += given
        if len(specs) > 1:
            raise OpenAIError(
                400, "give response_format or structured_outputs, not both", param="response_format"
            )
        return specs[0] if specs else None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def bias(self, vocab_size: int) -> tuple[tuple[int, float], ...]:
        """logit_bias as (id, bias) pairs, or a 400 for a key that is no id of the model's vocabulary."""
        pairs = []
        for key, value in (self.logit_bias or {}).items():
            if not key.isdigit() or int(key) >= vocab_size:
                raise OpenAIError(
                    400, f"logit_bias: {key!r} is not a token id below {vocab_size}", param="logit_bias"
                )
            if not -100 <= value <= 100:
                raise OpenAIError(400, f"logit_bias: {value} is outside -100..100", param="logit_bias")
            pairs.append((int(key), float(value)))
        return tuple(pairs)

    def token_logprobs(self) -> int | None:
        """How many alternatives to report with each generated token's log-probability (None: none); each
        endpoint reads its own fields for it."""
        return None

    def candidates(self) -> int:
        """How many generations run per prompt (best_of may ask for more than the n returned)."""
        return self.n

    def sampling_params(
        self, max_new_tokens: int, stop_token_ids: tuple[int, ...], vocab_size: int
    ) -> list[SamplingParams]:
        """One SamplingParams per candidate; candidate i of a seeded request uses seed + i."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        logprobs = self.token_logprobs()
        if self.candidates() > self.n and logprobs is None:
            logprobs = 0  # best_of ranks the candidates by their tokens' log-probabilities
        return [
            SamplingParams(
                max_new_tokens=max_new_tokens,
                temperature=self.temperature,
                top_p=self.top_p,
                top_k=self.top_k,
                min_p=self.min_p,
                presence_penalty=self.presence_penalty,
                frequency_penalty=self.frequency_penalty,
                repetition_penalty=self.repetition_penalty,
                stop_token_ids=stop_token_ids,
                stop_strings=tuple(stops),
                seed=None if self.seed is None else self.seed + index,
                logit_bias=self.bias(vocab_size),
                logprobs=logprobs,
                prompt_logprobs=self.echoed_logprobs(),
            )
            for index in range(self.candidates())
        ]

    def echoed_logprobs(self) -> int | None:
        """With completions' echo and logprobs: alternatives reported for each prompt token."""
        return None

    def reply(self) -> Reply:
        return Reply(n=self.n, logprobs=self.token_logprobs() is not None)


class CompletionRequest(SamplingFields):
    # text, texts, or token ids: one prompt's or several prompts' (lm-eval's local-completions sends ids)
    prompt: str | list[StrictInt] | list[str] | list[list[StrictInt]] = Field(min_length=1)
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    best_of: int | None = Field(None, ge=1, le=16)

    def requested_tokens(self) -> int | None:
        if self.max_tokens == 0 and not self.echo:
            raise OpenAIError(400, "max_tokens: 0 generates nothing; it needs echo", param="max_tokens")
        return self.max_tokens

    def token_logprobs(self) -> int | None:
        return self.logprobs

    def echoed_logprobs(self) -> int | None:
        return self.logprobs if self.echo else None

    def reply(self) -> Reply:
        return Reply(n=self.n, echo=self.echo, logprobs=self.logprobs is not None)

    def candidates(self) -> int:
        best_of = self.best_of or self.n
        if best_of < self.n:
            raise OpenAIError(400, f"best_of ({best_of}) must be at least n ({self.n})", param="best_of")
        if best_of > self.n and self.stream:
            raise OpenAIError(400, "best_of larger than n cannot be streamed", param="best_of")
        return best_of

    def prompts(self) -> list[str] | list[list[int]]:
        """The prompts, each text or token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if isinstance(self.prompt[0], int):
            return [self.prompt]  # one prompt's ids
        return self.prompt


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class CalledFunction(BaseModel):
    name: str
    arguments: str


class MessageToolCall(BaseModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None  # None only on an assistant turn that calls tools
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None

    def message(self) -> Message:
        """The turn as llmctl's templates take it (OpenAI's "developer" is the system turn)."""
        if self.content is None and not self.tool_calls:
            raise OpenAIError(400, f"a {self.role} message needs content", param="messages")
        content = self.content or ""
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        calls = tuple(call.model_dump() for call in self.tool_calls or ())
        role = "system" if self.role == "developer" else self.role
        return Message(role, content, tool_calls=calls, tool_call_id=self.tool_call_id)


FUNCTION_NAME = r"^[A-Za-z0-9_-]{1,64}$"


class FunctionDefinition(BaseModel):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    def functions(self) -> list[dict]:
        """The tools as the chat template takes them (OpenAI's objects)."""
        return [tool.model_dump(exclude_none=True) for tool in self.tools or ()]

    def forced_functions(self) -> list[dict]:
        """The functions a reply must call: all with "required", the one named, none otherwise."""
        choice = self.tool_choice
        if choice is None or choice in ("none", "auto"):
            return []
        if not self.tools:
            raise OpenAIError(400, "tool_choice needs tools", param="tool_choice")
        if choice == "required":
            return [tool.function.model_dump(exclude_none=True) for tool in self.tools]
        named = [tool.function for tool in self.tools if tool.function.name == choice.function.name]
        if not named:
            raise OpenAIError(
                400,
                f"tool_choice names {choice.function.name!r}, which is not among the tools",
                param="tool_choice",
            )
        return [named[0].model_dump(exclude_none=True)]

    def parses_tool_calls(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"

    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def token_logprobs(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise OpenAIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


class FeedbackRequest(BaseModel):
    """POST /v1/feedback: a score for a served completion, in [0, 1] or as thumbs."""

    id: str = Field(min_length=1, max_length=128)
    # strict: JSON true is not a score of 1
    score: Literal["up", "down"] | StrictInt | StrictFloat = Field(union_mode="left_to_right")
    user: str | None = Field(None, max_length=256)  # the user the completion was served to, if it named one

    def value(self) -> float:
        if self.score in ("up", "down"):
            return 1.0 if self.score == "up" else 0.0
        if not 0.0 <= self.score <= 1.0:
            raise OpenAIError(400, "score: a number from 0 to 1, or 'up' / 'down'", param="score")
        return float(self.score)
