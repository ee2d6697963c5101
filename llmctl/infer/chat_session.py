"""A chat conversation with a checkpoint: history, the model's chat format, slash commands and streamed replies.

Shared by the Textual app and the plain line-based REPL, so both behave the same.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from llmctl.atomic import atomic_write_text
from llmctl.data.chat import Message
from llmctl.data.chat_format import ChatFormat
from llmctl.data.tokenizer_base import Tokenizer
from llmctl.errors import UserError
from llmctl.infer.constraints import Constraint, ConstraintError, Constraints, ConstraintSpec
from llmctl.infer.decode import (
    PromptTooLong,
    compile_decode,
    limit_context,
    load_draft,
    load_for_inference,
    open_chat,
    warm_up_decode,
)
from llmctl.infer.fused_step import fused_serves_all
from llmctl.infer.generate import generate_ids
from llmctl.infer.prefix_cache import PrefixCache
from llmctl.infer.sampling import SamplingParams
from llmctl.infer.speculative import DEFAULT_LOOKAHEAD, speculative_generate_ids
from llmctl.infer.text import stream_text
from llmctl.model import Transformer

# /set NAME -> the SamplingParams field it changes, the type of its value and the range it must lie in
SETTABLE = {
    "temperature": ("temperature", float, "0 to 2", lambda v: 0 <= v <= 2),
    "top_p": ("top_p", float, "above 0, at most 1", lambda v: 0 < v <= 1),
    "top_k": ("top_k", int, "0 (off) or more", lambda v: v >= 0),
    "min_p": ("min_p", float, "0 to 1", lambda v: 0 <= v <= 1),
    "max_tokens": ("max_new_tokens", int, "1 or more", lambda v: v >= 1),
    "repetition_penalty": ("repetition_penalty", float, "above 0", lambda v: 0 < v < math.inf),
}
HELP = "commands: /reset, /system TEXT, /set NAME VALUE (" + ", ".join(SETTABLE) + "), /save FILE, /help"


def chat_sampling(temperature: float = 0.7, max_tokens: int = 256) -> SamplingParams:
    """Defaults for conversation: a little randomness, nucleus sampling and a mild repetition penalty."""
    return SamplingParams(
        max_new_tokens=max_tokens, temperature=temperature, top_p=0.95, top_k=50, repetition_penalty=1.1
    )


@dataclass
class ChatSession:
    model: Transformer
    tokenizer: Tokenizer
    chat: ChatFormat  # the model's own template, or llmctl's markers
    system: str | None = None
    settings: SamplingParams = field(default_factory=chat_sampling)
    history: list[Message] = field(default_factory=list)
    last_tokens_per_second: float = 0.0
    draft: Transformer | None = None  # a smaller model with the same tokenizer: speculative decoding
    lookahead: int = DEFAULT_LOOKAHEAD  # draft tokens proposed per target pass
    prefixes: PrefixCache | None = None  # the conversation so far, cached: each turn prefills only its news
    constraint: ConstraintSpec | None = None  # every reply follows it (chat --json-schema, --regex, --choice)
    constraints: Constraints | None = None

    def compiled_constraint(self) -> Constraint | None:
        """The reply's grammar, compiled anew for each reply (its state is the reply's)."""
        if self.constraint is None:
            return None
        if self.constraints is None:
            self.constraints = Constraints(self.tokenizer, self.model.config.vocab_size)
        return self.constraints.compile(self.constraint)

    def messages(self) -> list[Message]:
        return ([Message("system", self.system)] if self.system else []) + self.history

    def command(self, line: str) -> str:
        """Run a slash command; returns what to show the user."""
        name, _, argument = line[1:].partition(" ")
        argument = argument.strip()
        if name == "reset":
            self.history.clear()
            return "conversation cleared"
        if name == "system":
            if argument:
                tokens = len(self.tokenizer.encode(self.chat.render([Message("system", argument)])))
                room = self.model.config.max_seq_len // 2
                if tokens > room:  # every later message would be refused as too long
                    return f"system prompt of {tokens} tokens refused: it must leave room to talk ({room} at most)"
            self.system = argument or None
            return f"system prompt set to {argument!r}" if argument else "system prompt cleared"
        if name == "set":
            key, _, value = argument.partition(" ")
            if key not in SETTABLE:
                return f"cannot set {key!r}; settable: {', '.join(SETTABLE)}"
            name, kind, allowed, valid = SETTABLE[key]
            try:
                number = kind(value)
            except ValueError:
                return f"{key} needs a {kind.__name__}, got {value!r}"
            if not valid(number):  # NaN fails every comparison, so it is refused too
                return f"{key} must be {allowed}; got {value}"
            if key == "max_tokens" and number >= self.model.config.max_seq_len:
                return (
                    f"max_tokens must be below the model's context of {self.model.config.max_seq_len} tokens"
                )
            setattr(self.settings, name, number)
            return f"{key} = {number}"
        if name == "save":
            if not argument:
                return "usage: /save FILE"
            if not Path(argument).parent.is_dir():
                return f"cannot save to {argument}: {Path(argument).parent} is not a directory"
            record = {
                "system": self.system,
                "settings": asdict(self.settings),
                "messages": [asdict(m) for m in self.history],
            }
            try:
                atomic_write_text(Path(argument), json.dumps(record, indent=2, ensure_ascii=False) + "\n")
            except OSError as error:
                return f"cannot save to {argument}: {error.strerror or error}"
            return f"saved {len(self.history)} messages to {argument}"
        return HELP

    def reply(self, text: str) -> Iterator[str]:
        """Stream the assistant's reply to a user message; the finished reply joins the history."""
        message = Message("user", text)
        system = [Message("system", self.system)] if self.system else []
        context = self.model.config.max_seq_len
        alone = len(self.tokenizer.encode(self.chat.render([*system, message])))
        if alone >= context - 1:  # it cannot fit even without the history: the conversation stays as it was
            raise PromptTooLong(alone, context)
        self.history.append(message)
        prompt_ids = self.tokenizer.encode(self.chat.render(self.messages()))
        while len(prompt_ids) >= context - 1:  # forget the oldest turns first
            self.history.pop(0)
            prompt_ids = self.tokenizer.encode(self.chat.render(self.messages()))
        stop_ids = self.chat.stop_ids
        params = replace(self.settings, stop_token_ids=stop_ids)
        started, produced, parts = time.perf_counter(), 0, []
        if self.draft is not None:
            ids = speculative_generate_ids(
                self.model,
                self.draft,
                prompt_ids,
                params,
                self.lookahead,
                constraint=self.compiled_constraint(),
            )
        else:
            if self.prefixes is None:
                self.prefixes = PrefixCache(max_tokens=context)
            ids = generate_ids(self.model, prompt_ids, params, self.prefixes, self.compiled_constraint())
        for chunk in stream_text(self.tokenizer, prompt_ids, ids, stop_token_ids=stop_ids):
            produced += chunk.token_id is not None
            if chunk.text:
                parts.append(chunk.text)
                yield chunk.text
        self.last_tokens_per_second = produced / max(time.perf_counter() - started, 1e-9)
        self.history.append(Message("assistant", "".join(parts)))


@dataclass
class ChatOptions:
    """What `llmctl chat` was asked for: the model (and adapter), its template and context, the sampling, a
    draft, a constraint on every reply."""

    path: Path
    adapter: Path | None = None
    force: bool = False  # an adapter on other base weights than it was trained on
    chat_template: Path | None = None
    context: int | None = None
    system: str | None = None
    settings: SamplingParams = field(default_factory=chat_sampling)
    compile: bool = False  # compile the decode step before the first reply
    draft: Path | None = None
    lookahead: int = DEFAULT_LOOKAHEAD
    constraint: ConstraintSpec | None = None

    def open(self, report: Callable[[str], None] = lambda line: None) -> ChatSession:
        """Load the model and everything the session needs, failing now (a UserError) on what a first reply
        would fail on: a missing template, a draft of another tokenizer, a schema the engine refuses. Load it
        in `runtime.in_passing_thread` where replies come from other threads."""
        model, tokenizer = load_for_inference(self.path, self.adapter, force_base=self.force)
        limit_context(model, self.context)
        chat_format = open_chat(self.path, tokenizer, self.adapter, self.chat_template)
        if self.compile and not fused_serves_all(model, 1):  # the fused step needs no compiling
            report("compiling the decode step (once per start; tens of seconds)...")
            compile_decode(model)
            warm_up_decode(model, model.new_kv_cache(1, max_len=8, slots=True))
        session = ChatSession(model, tokenizer, chat_format, system=self.system, settings=self.settings)
        if self.draft is not None:
            session.draft = load_draft(self.draft, tokenizer, model)
            session.lookahead = self.lookahead
        if self.constraint is not None:
            session.constraint = self.constraint
            try:
                session.compiled_constraint()
            except ConstraintError as error:
                raise UserError(f"cannot constrain the replies: {error}") from None
        return session
