"""How a model chats: the text a conversation becomes, which spans of it a finetune trains on, and the tokens
that end a reply. An open model's own Jinja template where it has one (or `--chat-template FILE`); llmctl's
marker template for the tokenizers llmctl trains, whose markers are single tokens; otherwise no chat at all,
refused in one line rather than prompted in a format the model never saw."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

from llmctl.data.chat import END, Message, render_chat
from llmctl.data.chat_template import GENERATION_CONFIG_FILE, ChatTemplate, TrainingText, find_chat_template
from llmctl.data.tokenizer_base import CHAT_MARKERS, Tokenizer
from llmctl.errors import UserError


class ChatFormat(Protocol):
    source: str  # the template's text: a finetune's data fingerprint includes it
    stop_ids: tuple[int, ...]
    # llmctl puts bos before and eos after a training example of its own format; a template writes its own
    frames_examples: bool

    def render(
        self, messages: list[Message], add_generation_prompt: bool = True, tools: list[dict] | None = None
    ) -> str: ...
    @property
    def takes_tools(self) -> bool: ...
    def training_text(self, messages: list[Message]) -> TrainingText: ...


class MarkerFormat:
    """llmctl's own template (data/chat.py), for a tokenizer that has its markers as single tokens."""

    frames_examples = True
    source = "llmctl chat markers"

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.stop_ids = (tokenizer.eos_id, tokenizer.piece_id(END))
        for marker in CHAT_MARKERS:
            tokenizer.piece_id(marker)  # each must be one token: the error names the missing one

    takes_tools = False  # llmctl's own format has no tool turns

    def render(
        self, messages: list[Message], add_generation_prompt: bool = True, tools: list[dict] | None = None
    ) -> str:
        return render_chat(messages, add_generation_prompt)

    def training_text(self, messages: list[Message]) -> TrainingText:
        """Each assistant reply and its end marker."""
        spans, position = [], 0
        for message in messages:
            rendered = render_chat([message], add_generation_prompt=False)
            if message.role == "assistant":
                start = position + rendered.index("\n") + 1
                spans.append((start, start + len(message.content) + len(END)))
            position += len(rendered)
        return TrainingText(render_chat(messages, add_generation_prompt=False), spans)


class TemplateFormat:
    """A Jinja chat template, rendered with the tokenizer's special tokens; a reply ends at any id of the
    generation config's eos_token_id list (`<|im_end|>`, `<|eot_id|>`) or the tokenizer's eos."""

    frames_examples = False

    def __init__(self, template: ChatTemplate, stop_ids: tuple[int, ...], tokenizer: Tokenizer) -> None:
        self.template, self.stop_ids, self.source = template, stop_ids, template.source
        self.end_marks = tuple(tokenizer.token_text(token_id) for token_id in stop_ids)

    @property
    def takes_tools(self) -> bool:
        return self.template.takes_tools

    def render(
        self, messages: list[Message], add_generation_prompt: bool = True, tools: list[dict] | None = None
    ) -> str:
        return self.template.render(messages, add_generation_prompt, tools)

    def training_text(self, messages: list[Message]) -> TrainingText:
        return self.template.training_text(messages, self.end_marks)


def open_chat_format(directory: Path, tokenizer: Tokenizer, template_file: Path | None = None) -> ChatFormat:
    """The chat format of the model in `directory` (where its tokenizer and generation config are), or of
    `template_file` when one is given."""
    directory = Path(directory)
    if template_file is not None:
        template_file = Path(template_file)
        if not template_file.is_file():
            raise UserError(f"--chat-template {template_file}: no such file (a Jinja chat template)")
        source, origin = template_file.read_text(encoding="utf-8"), str(template_file)
    else:
        source, origin = find_chat_template(directory), str(directory)
    if source is None:
        try:
            return MarkerFormat(tokenizer)
        except UserError:
            raise UserError(
                f"{directory} has no chat template (no chat_template.jinja, nor chat_template in "
                "tokenizer_config.json); pass --chat-template FILE with the template the model was trained with"
            ) from None
    template = ChatTemplate(source, _special_tokens(tokenizer), origin)
    return TemplateFormat(template, _stop_ids(directory, tokenizer), tokenizer)


def _special_tokens(tokenizer: Tokenizer) -> dict[str, str]:
    """bos_token, eos_token and pad_token as the template reads them."""
    ids = {"bos": tokenizer.bos_id, "eos": tokenizer.eos_id, "pad": tokenizer.pad_id}
    return {f"{role}_token": tokenizer.token_text(token_id) for role, token_id in ids.items()}


def _stop_ids(directory: Path, tokenizer: Tokenizer) -> tuple[int, ...]:
    path = directory / GENERATION_CONFIG_FILE
    try:
        configured = (
            json.loads(path.read_text(encoding="utf-8")).get("eos_token_id") if path.is_file() else None
        )
    except (ValueError, AttributeError):
        raise UserError(f"{path} is not a JSON object; restore it from the model's source") from None
    listed = configured if isinstance(configured, list) else [configured]
    ids = [tokenizer.eos_id, *(token for token in listed if isinstance(token, int))]
    return tuple(dict.fromkeys(ids))
