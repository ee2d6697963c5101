"""The chat template: `llmctl chat` and the server's /v1/chat/completions render conversations with it, and
so must anything that trains a model to chat, so the model is prompted as it was trained.

    <|system|>\n{text}<|end|>\n<|user|>\n{text}<|end|>\n<|assistant|>\n{reply}<|end|>\n

The role markers are user-defined symbols of every llmctl tokenizer, so each is a single token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from llmctl.data.tokenizer import CHAT_MARKERS

ROLES = ("system", "user", "assistant")
END = CHAT_MARKERS[3]


@dataclass(frozen=True)
class Message:
    role: Literal["system", "user", "assistant"]
    content: str


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
