"""vLLM's tokenizer endpoints, /tokenize, /detokenize and /tokenizer_info: what lets a client count and
score tokens against the served model's own tokenizer (lm-evaluation-harness's `local-completions` picks its
remote tokenizer when a server answers them)."""

from __future__ import annotations

import asyncio

from fastapi import Request
from pydantic import BaseModel, Field, StrictInt

from llmctl.data.chat_format import TemplateFormat
from llmctl.infer.api_schema import OpenAIError
from llmctl.infer.served import ServedModel


class TokenizeRequest(BaseModel):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True  # the model's own tokenizer's default specials (a bos, for Llama's)


class DetokenizeRequest(BaseModel):
    model: str | None = None
    tokens: list[StrictInt] = Field(max_length=1 << 20)


def _served(request: Request, name: str | None) -> ServedModel:
    """The model named, or the only one served; several served models need the name."""
    state = request.app.state.llmctl
    if name is not None:
        return state.resolve(name)
    if len(state.models) != 1:
        raise OpenAIError(
            400, f"several models are served ({', '.join(state.models)}): name one in model", param="model"
        )
    return next(iter(state.models.values()))


async def tokenize(body: TokenizeRequest, request: Request) -> dict:
    served = _served(request, body.model)
    encode = served.tokenizer.encode_with_specials if body.add_special_tokens else served.tokenizer.encode
    tokens = await asyncio.to_thread(encode, body.prompt)
    return {"count": len(tokens), "max_model_len": served.context, "tokens": tokens, "token_strs": None}


async def detokenize(body: DetokenizeRequest, request: Request) -> dict:
    served = _served(request, body.model)
    vocab = served.engine.model.config.vocab_size
    outside = next((token for token in body.tokens if not 0 <= token < vocab), None)
    if outside is not None:
        raise OpenAIError(
            400, f"tokens: id {outside} is outside the vocabulary (0..{vocab - 1})", param="tokens"
        )
    return {"prompt": await asyncio.to_thread(served.tokenizer.decode, body.tokens)}


async def tokenizer_info(request: Request, model: str | None = None) -> dict:
    served = _served(request, model)
    tokenizer = served.tokenizer
    chat = served.chat  # a jinja template's text; llmctl's own markers are no template
    return {
        "tokenizer_class": type(tokenizer).__name__,
        "vocab_size": tokenizer.vocab_size,
        "bos_token": tokenizer.token_text(tokenizer.bos_id),
        "eos_token": tokenizer.token_text(tokenizer.eos_id),
        "pad_token": tokenizer.token_text(tokenizer.pad_id),
        "model_max_length": served.context,
        "chat_template": chat.source if isinstance(chat, TemplateFormat) else None,
    }


def add_tokenizer_routes(app) -> None:
    app.post("/tokenize")(tokenize)
    app.post("/detokenize")(detokenize)
    app.get("/tokenizer_info")(tokenizer_info)
