"""The chat template: `llmctl chat` and the server's /v1/chat/completions render conversations with it, and
so must anything that trains a model to chat, so the model is prompted as it was trained.

    <|system|>\n{text}<|end|>\n<|user|>\n{text}<|end|>\n<|assistant|>\n{reply}<|end|>\n

The role markers are user-defined symbols of every llmctl tokenizer, so each is a single token.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

from llmctl.data.tokenizer_base import CHAT_MARKERS

ROLES = ("system", "user", "assistant")
END = CHAT_MARKERS[3]


@dataclass(frozen=True)
class Message:
    role: Literal["system", "user", "assistant", "tool"]
    content: str
    # an assistant turn's calls, as OpenAI's tool_calls objects; a tool turn answers the call of this id
    tool_calls: tuple[dict, ...] = ()
    tool_call_id: str | None = None

    def as_template_input(self) -> dict:
        """The message as chat templates read it (transformers' conversation dicts)."""
        message: dict = {"role": self.role, "content": self.content}
        if self.tool_calls:
            message["tool_calls"] = [
                {**call, "function": {**call["function"], "arguments": _arguments(call["function"])}}
                for call in self.tool_calls
            ]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


def _arguments(function: dict) -> object:
    """A call's arguments as a mapping where they are JSON text (templates write them with tojson)."""
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments


def marker(role: str) -> str:
    return f"<|{role}|>"


def render_chat(messages: list[Message], add_generation_prompt: bool = True) -> str:
    parts = []
    for message in messages:
        if message.role not in ROLES:
            raise ValueError(f"unknown chat role {message.role!r}; expected one of {', '.join(ROLES)}")
        parts.append(f"{marker(message.role)}\n{message.content}{END}\n")
    if add_generation_prompt:
        parts.append(f"{marker('assistant')}\n")
    return "".join(parts)
