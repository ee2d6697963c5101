"""What a user may change in `llmctl up`'s stages: `--set stage.key=value` and a TOML settings file of the same
keys, sorted into each stage's settings and checked before any work starts."""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmctl.data.corpus import CorpusOptions
from llmctl.errors import UserError
from llmctl.recipe import apply_override

RECIPE_SECTIONS = ("model", "data", "train", "optim", "schedule", "checkpoint", "distributed", "finetune")
CORPUS_KEYS = (
    "val_fraction",
    "near_dup_threshold",
    "exact_dedup",
    "scrub_pii",
    "html",
    "seed",
    "workers",
    "text_field",
    "max_document_bytes",
)


@dataclass(frozen=True)
class ChatSettings:
    enabled: bool = True
    examples: int = 400  # starter examples made from the corpus's headed sections
    share: float = 0.15  # of the training time, when the budget leaves at least `min_minutes` for it
    min_minutes: float = 0.5


@dataclass(frozen=True)
class UpSettings:
    corpus: dict[str, Any] = field(default_factory=dict)
    tokenizer: dict[str, Any] = field(default_factory=dict)  # vocab_size, model_type
    recipe: dict[str, Any] = field(default_factory=dict)  # the training recipe's own sections
    chat: ChatSettings = ChatSettings()
    quantize: bool = True

    def corpus_options(self) -> CorpusOptions:
        return CorpusOptions(**{"val_fraction": 0.1, **self.corpus})

    def as_key(self) -> dict:
        return {
            "corpus": self.corpus,
            "tokenizer": self.tokenizer,
            "recipe": self.recipe,
            "chat": dataclasses.asdict(self.chat),
            "quantize": self.quantize,
        }


def read_settings(file: Path | None, overrides: list[str]) -> UpSettings:
    """The settings file's keys, then each `--set`, sorted by stage; an unknown stage or key is one line."""
    raw: dict[str, Any] = {}
    if file is not None:
        try:
            raw = tomllib.loads(Path(file).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
            raise UserError(f"cannot read the settings file {file}: {error}") from None
    for override in overrides:
        apply_override(raw, override)
    stages = ("corpus", "tokenizer", "chat", "quantize", *RECIPE_SECTIONS)
    unknown = sorted(set(raw) - set(stages))
    if unknown:
        raise UserError(f"unknown stage {unknown[0]!r} in --set/--settings; stages: {', '.join(stages)}")
    corpus = _section(raw, "corpus", CORPUS_KEYS)
    tokenizer = _section(raw, "tokenizer", ("vocab_size", "model_type"))
    chat_keys = tuple(f.name for f in dataclasses.fields(ChatSettings))
    quantize = _section(raw, "quantize", ("enabled",))
    chat = ChatSettings(**_section(raw, "chat", chat_keys))
    for setting in dataclasses.fields(ChatSettings):
        _check_type(f"chat.{setting.name}", getattr(chat, setting.name), type(setting.default))
    enabled = quantize.get("enabled", True)
    _check_type("quantize.enabled", enabled, bool)
    recipe = {name: raw[name] for name in RECIPE_SECTIONS if name in raw}
    return UpSettings(corpus, tokenizer, recipe, chat, enabled)


def _check_type(key: str, value: Any, expected: type) -> None:
    """A setting of the wrong kind (`--set quantize.enabled=no`) is one line, not a silent truthy string."""
    numeric = expected is float and isinstance(value, int) and not isinstance(value, bool)
    if not (numeric or (isinstance(value, expected) and (expected is bool or not isinstance(value, bool)))):
        raise UserError(
            f"--set {key}={value!r}: expected {expected.__name__}, e.g. {key}={_example(expected)}"
        )


def _example(expected: type) -> str:
    return {bool: "false", int: "200", float: "0.2"}[expected]


def _section(raw: dict[str, Any], name: str, keys: tuple[str, ...]) -> dict[str, Any]:
    section = raw.get(name, {})
    if not isinstance(section, dict):
        raise UserError(f"{name} is a stage; set its keys: --set {name}.{keys[0]}=...")
    unknown = sorted(set(section) - set(keys))
    if unknown:
        raise UserError(f"{name}.{unknown[0]}: unknown key; {name} takes {', '.join(keys)}")
    return dict(section)
