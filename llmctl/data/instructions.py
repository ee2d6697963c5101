"""Chat and instruction examples for finetuning: read and check JSONL, render with `llmctl chat`'s template,
mask the loss to assistant tokens, and pack examples into fixed training windows.

Accepted lines: `{"messages": [{"role": ..., "content": ...}, ...]}` or `{"prompt": ..., "completion": ...}`.
A packed window holds whole examples, each ending in eos; the trainer keeps attention inside each one.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from llmctl.atomic import atomic_write_text, check_output
from llmctl.data.chat import ROLES, Message
from llmctl.data.chat_format import ChatFormat
from llmctl.data.corpus import SPLITS, iter_texts, read_manifest
from llmctl.data.tokenizer_base import CHAT_MARKERS, Tokenizer
from llmctl.errors import UserError

IGNORE = -100  # the target id that carries no loss (torch's cross-entropy default)


def heading_sections(text: str) -> Iterator[tuple[str, str]]:
    """(heading, first paragraph) of each section of a document: a short line that does not end like a
    sentence, followed by a paragraph of some length (how Markdown, reST and most exported docs look)."""
    blocks = [block.strip() for block in text.split("\n\n") if block.strip()]
    for heading, body in zip(blocks, blocks[1:], strict=False):
        if "\n" in heading or len(heading) > 60 or heading.endswith((".", ":")) or len(body) < 80:
            continue
        yield heading, body


def section_examples(texts: list[str], max_chars: int = 1200) -> list[dict]:
    """A starter instruction set from plain documents: "Explain: <heading>" answered by its first paragraph."""
    return [
        {"prompt": f"Explain: {heading}", "completion": body}
        for text in texts
        for heading, body in heading_sections(text)
        if len(body) <= max_chars and not any(marker in heading + body for marker in CHAT_MARKERS)
    ]


def read_examples(path: Path) -> list[list[Message]]:
    """Every example of a JSONL file; the first malformed line is one error naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"examples file not found: {path} (JSONL, one chat or prompt/completion per line)")
    examples = []
    with path.open(encoding="utf-8", errors="strict") as lines:
        try:
            for number, line in enumerate(lines, 1):
                if line.strip():
                    examples.append(_parse_example(line, f"{path}:{number}"))
        except UnicodeDecodeError:
            raise UserError(f"{path} is not UTF-8 text; convert it (iconv -t utf-8)") from None
    if not examples:
        raise UserError(f"{path} holds no examples")
    return examples


def _parse_example(line: str, where: str) -> list[Message]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise UserError(f"{where}: not valid JSON ({error.msg})") from None
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected an object with messages or prompt/completion")
    if "messages" in record:
        raw = record["messages"]
        if not isinstance(raw, list) or not raw:
            raise UserError(f"{where}: messages must be a non-empty list")
        messages = []
        for index, message in enumerate(raw):
            if not isinstance(message, dict) or not isinstance(message.get("content"), str):
                raise UserError(f"{where}: messages[{index}] needs a role and a string content")
            if message.get("role") not in ROLES:
                raise UserError(
                    f"{where}: messages[{index}] has unknown role {message.get('role')!r}; use {', '.join(ROLES)}"
                )
            messages.append(Message(message["role"], message["content"]))
    elif "prompt" in record or "completion" in record:
        prompt, completion = record.get("prompt"), record.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise UserError(f"{where}: prompt and completion must both be strings")
        messages = [Message("user", prompt), Message("assistant", completion)]
    else:
        raise UserError(f"{where}: expected a messages list or prompt and completion fields")
    if not any(message.role == "assistant" and message.content for message in messages):
        raise UserError(f"{where}: no assistant reply to learn from")
    for index, message in enumerate(messages):
        if any(marker in message.content for marker in CHAT_MARKERS):
            raise UserError(f"{where}: messages[{index}] contains a chat marker ({', '.join(CHAT_MARKERS)})")
    return messages


@dataclass(frozen=True)
class Example:
    ids: np.ndarray  # int64: bos, the rendered conversation, eos
    loss: np.ndarray  # bool, per id: whether the model is trained to predict it


def tokenize_example(messages: list[Message], tokenizer: Tokenizer, chat: ChatFormat) -> Example:
    """Rendered exactly as the model is prompted in chat; the loss covers each assistant reply and the mark
    that ends it. llmctl's own format is framed by bos and eos; a template writes its own special tokens."""
    rendered = chat.training_text(messages)
    ids, starts = tokenizer.encode_with_offsets(rendered.text)
    trained = [any(begin <= start < end for begin, end in rendered.spans) for start in starts]
    if chat.frames_examples:
        ids, trained = [tokenizer.bos_id, *ids, tokenizer.eos_id], [False, *trained, False]
    return Example(np.array(ids, dtype=np.int64), np.array(trained, dtype=bool))


@dataclass(frozen=True)
class PackedWindows:
    """Fixed windows of seq_len + 1 ids with their loss masks, and what packing had to do."""

    ids: np.ndarray  # (windows, seq_len + 1)
    loss: np.ndarray  # (windows, seq_len + 1) bool
    # (windows, seq_len + 1): which example of its window each position holds (padding: the last one's), so
    # attention stays inside an example even where a chat template puts eos inside it (ChatML's <|im_end|>)
    segments: np.ndarray
    examples: int
    truncated: int
    skipped: int

    def __len__(self) -> int:
        return len(self.ids)


WINDOW_MULTIPLE = 64


def example_window(examples: list[Example], context: int) -> int:
    """A finetune's window when the recipe sets none: the longest example's length, rounded up to a multiple of
    64, within the model's context. A base trained for 8k or 128k positions would otherwise pack short chats
    into windows of its whole context, whose attention alone outgrows a machine's memory."""
    longest = max((len(example.ids) - 1 for example in examples), default=1)  # inputs: all but the last id
    return max(2, min(context, -(-longest // WINDOW_MULTIPLE) * WINDOW_MULTIPLE))


def pack_examples(
    examples: list[Example],
    seq_len: int,
    pad_id: int,
    packing: bool,
    overlong: Literal["truncate", "skip"],
) -> PackedWindows:
    """Whole examples in order, several per window with `packing`, one per window without. An example longer
    than a window is cut to fit or left out, as `overlong` says; both are counted."""
    size = seq_len + 1
    windows: list[list[Example]] = []
    truncated = skipped = 0
    used = size
    for example in examples:
        if len(example.ids) > size:
            if overlong == "skip" or not example.loss[:size].any():
                skipped += 1
                continue
            example = Example(example.ids[:size], example.loss[:size])
            truncated += 1
        if packing and used + len(example.ids) <= size:
            windows[-1].append(example)
            used += len(example.ids)
        else:
            windows.append([example])
            used = len(example.ids)
    if not windows:
        raise UserError(
            f"every example is longer than the context of {seq_len} tokens; set finetune.overlong = "
            '"truncate" or use a longer train.seq_len'
        )
    ids = np.full((len(windows), size), pad_id, dtype=np.int64)
    loss = np.zeros((len(windows), size), dtype=bool)
    segments = np.zeros((len(windows), size), dtype=np.int64)
    for row, window in enumerate(windows):
        filled = np.concatenate([example.ids for example in window])
        ids[row, : len(filled)] = filled
        loss[row, : len(filled)] = np.concatenate([example.loss for example in window])
        lengths = [len(example.ids) for example in window]
        segments[row, : len(filled)] = np.repeat(np.arange(len(window)), lengths)
        segments[row, len(filled) :] = len(window) - 1
    return PackedWindows(ids, loss, segments, len(examples) - skipped, truncated, skipped)


def examples_fingerprint(files: list[Path], tokenizer: Tokenizer, settings: str) -> str:
    """Identifies the training windows (the example files, tokenizer and packing settings), so a resumed run
    refuses data that changed under it."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(hashlib.sha256(Path(path).read_bytes()).digest())
    digest.update(f"{tokenizer.sha256()} {settings}".encode())
    return digest.hexdigest()


def write_starter_set(
    corpus: Path,
    out: Path,
    split: str = "train",
    limit: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
) -> int:
    """A starter instruction set from a corpus's documents, "Explain: HEADING" -> the section's first
    paragraph, written to `out` as prompt/completion JSONL (a seeded sample of at most `limit`); the count."""
    if split not in SPLITS:
        raise UserError(f"--split {split!r}: choose one of {', '.join(SPLITS)}")
    read_manifest(corpus)
    check_output(out, [corpus], overwrite)
    examples = section_examples(list(iter_texts(corpus, split)))
    if not examples:
        raise UserError(
            f"no heading + paragraph sections found in the {split} split of {corpus}; write examples by hand "
            '(JSONL: {"prompt": ..., "completion": ...})'
        )
    if limit is not None and len(examples) > limit:
        examples = random.Random(seed).sample(examples, limit)
    atomic_write_text(out, "".join(json.dumps(example, ensure_ascii=False) + "\n" for example in examples))
    return len(examples)
