"""A model's own chat template: the Jinja template an open model ships (`chat_template.jinja`, or
`chat_template` in `tokenizer_config.json`), or one named with `--chat-template FILE`, rendered the way
transformers' `apply_chat_template` renders it, so llmctl prompts and trains a model exactly as its makers did.

The environment is sandboxed (a template comes from the model's download: untrusted code), trims blocks like
transformers', and knows `raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII text, and the
`{% generation %}` tag that marks the assistant's tokens for training.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.meta
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llmctl.data.chat import Message
from llmctl.data.tokenizer_base import TOKENIZER_CONFIG_FILE
from llmctl.errors import UserError

TEMPLATE_FILE = "chat_template.jinja"
TEMPLATE_JSON_FILE = "chat_template.json"
GENERATION_CONFIG_FILE = "generation_config.json"  # its eos_token_id list: the tokens that end a reply


def find_chat_template(directory: Path) -> str | None:
    """The template a model directory ships, where transformers looks for it; None when it has none."""
    directory = Path(directory)
    if (directory / TEMPLATE_FILE).is_file():
        return (directory / TEMPLATE_FILE).read_text(encoding="utf-8")
    for name in (TEMPLATE_JSON_FILE, TOKENIZER_CONFIG_FILE):
        path = directory / name
        if not path.is_file():
            continue
        try:
            template = json.loads(path.read_text(encoding="utf-8")).get("chat_template")
        except (ValueError, AttributeError):
            raise UserError(f"{path} is not a JSON object; restore it from the model's source") from None
        if isinstance(template, list):  # named templates: the default one is for chat
            named = {item.get("name"): item.get("template") for item in template if isinstance(item, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        if isinstance(template, str):
            return template
    return None


class _Generation(Extension):
    """`{% generation %}...{% endgeneration %}`: records where in the output the block's text lands."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> nodes.CallBlock:
        line = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_mark", []), [], [], body).set_lineno(line)

    def _mark(self, caller) -> str:
        return f"{GENERATION_START}{caller()}{GENERATION_END}"


# Private-use characters a conversation never holds (rendering is refused if it does): where a generation
# block starts and ends in the rendered text, removed before the text is used.
GENERATION_START, GENERATION_END = "\U000f0001", "\U000f0002"
GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _environment() -> ImmutableSandboxedEnvironment:
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, loopcontrols]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    return environment


@dataclass(frozen=True)
class TrainingText:
    """A whole conversation as rendered for training, and the character spans of it the loss covers."""

    text: str
    spans: list[tuple[int, int]] = field(default_factory=list)


class ChatTemplate:
    """One compiled template with the special tokens it is rendered with (bos_token, eos_token, ...)."""

    def __init__(self, source: str, special_tokens: dict[str, str], origin: str) -> None:
        self.source, self.special_tokens, self.origin = source, special_tokens, origin
        try:
            self.template = _environment().from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as error:
            raise UserError(
                f"the chat template of {origin} does not parse: {error} (line {error.lineno})"
            ) from None
        self.marks_generation = GENERATION_TAG.search(source) is not None
        # whether it reads `tools`, the name transformers passes a request's tools to a template by
        self.takes_tools = "tools" in jinja2.meta.find_undeclared_variables(_environment().parse(source))

    def _render(
        self, messages: list[Message], add_generation_prompt: bool, tools: list[dict] | None = None
    ) -> str:
        conversation = [message.as_template_input() for message in messages]
        for message in messages:
            if GENERATION_START in message.content or GENERATION_END in message.content:
                raise UserError("a message holds a private-use character llmctl reserves (U+F0001/U+F0002)")
        try:
            return self.template.render(
                messages=conversation,
                add_generation_prompt=add_generation_prompt,
                **({"tools": tools} if tools else {}),
                **self.special_tokens,
            )
        except jinja2.exceptions.TemplateError as error:  # raise_exception, or the sandbox refusing
            raise UserError(f"the chat template of {self.origin} refused the conversation: {error}") from None

    def render(
        self, messages: list[Message], add_generation_prompt: bool = True, tools: list[dict] | None = None
    ) -> str:
        text = self._render(messages, add_generation_prompt, tools)
        return text.replace(GENERATION_START, "").replace(GENERATION_END, "")

    def training_text(self, messages: list[Message], end_marks: tuple[str, ...]) -> TrainingText:
        """The conversation and its assistant spans: the template's `{% generation %}` blocks where it has
        them; else each reply as the difference between rendering the turns before it (with the generation
        prompt) and those up to it; else, for a template that renders earlier turns differently once later
        ones follow, each reply's text found in order, with the end mark (`end_marks`) that follows it."""
        if self.marks_generation:
            return _marked_spans(self._render(messages, False))
        text = self.render(messages, add_generation_prompt=False)
        spans = self._prefix_spans(messages, text)
        if spans is None:
            spans = _found_spans(messages, text, end_marks)
        return TrainingText(text, spans)

    def _prefix_spans(self, messages: list[Message], text: str) -> list[tuple[int, int]] | None:
        spans = []
        for index, message in enumerate(messages):
            if message.role != "assistant":
                continue
            before = self.render(messages[:index], add_generation_prompt=True)
            through = self.render(messages[: index + 1], add_generation_prompt=False)
            if not (text.startswith(through) and through.startswith(before)):
                return None
            end = len(through.rstrip())  # the reply and its end mark, not the newline the template adds
            spans.append((len(before), max(end, len(before))))
        return spans


def _marked_spans(marked: str) -> TrainingText:
    text, spans = [], []
    position = 0
    for piece in marked.split(GENERATION_START):
        inside, end, after = piece.partition(GENERATION_END)
        if end:  # the piece opened a generation block
            spans.append((position, position + len(inside)))
            text.append(inside + after)
            position += len(inside) + len(after)
        else:
            text.append(piece)
            position += len(piece)
    return TrainingText("".join(text), spans)


def _found_spans(messages: list[Message], text: str, end_marks: tuple[str, ...]) -> list[tuple[int, int]]:
    spans, cursor = [], 0
    for message in messages:
        content = message.content.strip()
        start = text.find(content, cursor) if content else -1
        if start < 0:
            if message.role == "assistant":
                raise UserError(
                    "the chat template rewrites an assistant reply, so its tokens cannot be found for the loss; "
                    "use a template with {% generation %} markers (--chat-template FILE)"
                )
            continue
        end = start + len(content)
        if message.role == "assistant":
            rest = text[end:]
            mark = next((m for m in end_marks if rest.lstrip(" \n").startswith(m)), None)
            if mark is not None:
                end += len(rest) - len(rest.lstrip(" \n")) + len(mark)
            spans.append((start, end))
        cursor = end
    return spans
