"""Constrained decoding: each next token masked to those a grammar allows, so that the text generated is a
JSON object, matches a JSON schema or a regular expression, is one of fixed choices, or follows a Lark or GBNF
grammar. The grammar engine is llguidance, picked by measurement (benchmarks/grammar_engines.py): it compiles
a schema in about a millisecond, where xgrammar and outlines-core take 0.4-2.6 s, and its masks were the
quickest on a 151k vocabulary.

A `Constraint` is one generation's state; `Constraints` builds llguidance's view of a tokenizer once and
compiles specs against it. A spec the engine cannot compile is a `ConstraintError` naming what it refuses."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from llmctl.data.tokenizer_base import CHAT_MARKERS, Tokenizer
from llmctl.errors import require_extra

Kind = Literal["json_object", "json_schema", "regex", "choice", "grammar"]
# JSON as json.dumps writes it, with no other whitespace: a small model given free whitespace may spend its
# whole budget on newlines. A schema's own "x-guidance" settings override these.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class ConstraintError(ValueError):
    """A constraint the grammar engine refuses (an unsupported schema keyword, a malformed regex or grammar)."""


@dataclass(frozen=True)
class ConstraintSpec:
    """What the output must be: `value` is the schema (json_schema), the pattern (regex), the strings (choice)
    or the Lark or GBNF text (grammar); json_object takes none."""

    kind: Kind
    value: object = None

    def grammar(self) -> str:
        """llguidance's grammar for the spec."""
        llguidance = require_extra("llguidance", "serve", "constrained decoding")
        matcher = llguidance.LLMatcher
        if self.kind == "json_object":
            return matcher.grammar_from_json_schema(json.dumps({"type": "object"}), defaults=JSON_LAYOUT)
        if self.kind == "json_schema":
            schema = self.value if isinstance(self.value, str) else json.dumps(self.value)
            try:
                return matcher.grammar_from_json_schema(schema, defaults=JSON_LAYOUT)
            except ValueError as error:
                raise ConstraintError(f"the schema is not a JSON object: {error}") from None
        if self.kind == "regex":
            return matcher.grammar_from_regex(str(self.value))
        if self.kind == "choice":
            choices = list(self.value or [])
            if not choices or not all(isinstance(choice, str) and choice for choice in choices):
                raise ConstraintError("choice needs a list of non-empty strings")
            return matcher.grammar_from_lark("start: " + " | ".join(json.dumps(choice) for choice in choices))
        text = str(self.value)
        if "::=" in text:  # GBNF (llama.cpp's grammars), converted to Lark
            from llguidance.gbnf_to_lark import gbnf_to_lark

            try:
                text = gbnf_to_lark(text)
            except Exception as error:  # the converter raises its own parse errors
                raise ConstraintError(f"invalid GBNF grammar: {error}") from None
        return matcher.grammar_from_lark(text)


class Constraints:
    """Compiles specs for one tokenizer and a model's `vocab_size` logits (ids past the tokenizer's are never
    allowed). Building llguidance's view of a vocabulary takes ~0.1-0.4 s, once, on first use."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self._vocabulary = None

    def vocabulary(self):
        if self._vocabulary is None:
            self._vocabulary = llguidance_tokenizer(self.tokenizer, self.vocab_size)
        return self._vocabulary

    def compile(self, spec: ConstraintSpec) -> Constraint:
        llguidance = require_extra("llguidance", "serve", "constrained decoding")
        grammar = spec.grammar()
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.vocabulary())
        if failed:
            raise ConstraintError(f"{spec.kind}: {messages[0].splitlines()[0] if messages else 'invalid'}")
        return Constraint(llguidance.LLMatcher(self.vocabulary(), grammar), self.vocab_size)


class Constraint:
    """One generation under a grammar: `allow` masks a row of logits before sampling, `advance` takes the
    token sampled. Once the grammar is complete its end token is allowed, as are the generation's own stop
    tokens (a chat template's end of turn), and `finished` says when nothing else may follow."""

    def __init__(self, matcher, vocab_size: int) -> None:
        self.matcher, self.vocab_size = matcher, vocab_size
        self.bits = np.zeros((vocab_size + 31) // 32, dtype=np.int32)

    def allowed(self, stop_ids: tuple[int, ...] = ()) -> torch.Tensor:
        """The tokens allowed next, (vocab_size,) bool."""
        self.matcher.unsafe_compute_mask_ptr(self.bits.ctypes.data, self.bits.nbytes)
        if self.matcher.is_error():
            raise ConstraintError(f"the grammar cannot go on: {self.matcher.get_error()}")
        allowed = np.unpackbits(self.bits.view(np.uint8), bitorder="little")[: self.vocab_size].astype(bool)
        # a stop token ends the text: only where the grammar may end (a chat marker spelled inside a JSON
        # string would otherwise cut the object short)
        allowed[[token for token in stop_ids if token < self.vocab_size]] = self.matcher.is_accepting()
        return torch.from_numpy(allowed)

    def allow(self, logits: torch.Tensor, stop_ids: tuple[int, ...] = ()) -> None:
        """Set every token the grammar does not allow next to -inf, in place, in one row of logits."""
        allowed = self.allowed(stop_ids).to(logits.device)
        logits.masked_fill_(~allowed[: logits.shape[-1]], float("-inf"))

    def advance(self, token: int, stop_ids: tuple[int, ...] = ()) -> bool:
        """Take the token sampled; False where it was a stop token the grammar need not see."""
        if token in stop_ids and self.matcher.is_accepting():
            return False  # the generation ends on it; the grammar need not know the template's end token
        if not self.matcher.consume_token(token):
            raise ConstraintError(f"token {token} breaks the grammar: {self.matcher.get_error()}")
        return True

    def rollback(self, tokens: int) -> None:
        """Forget the last `tokens` advanced (a speculative round's refused proposals)."""
        if tokens and not self.matcher.rollback(tokens):
            raise ConstraintError(f"the grammar cannot roll back {tokens} tokens: {self.matcher.get_error()}")

    def copy(self) -> Constraint:
        """An independent state from here on (a beam that branches)."""
        return Constraint(self.matcher.deep_copy(), self.vocab_size)

    def mask(self, logits: torch.Tensor, stop_ids: tuple[int, ...] = ()) -> torch.Tensor:
        """A copy of a row of logits with what the grammar does not allow next at -inf."""
        allowed = self.allowed(stop_ids).to(logits.device)
        return logits.masked_fill(~allowed[: logits.shape[-1]], float("-inf"))

    @property
    def finished(self) -> bool:
        """The grammar is complete and allows nothing more."""
        return self.matcher.is_stopped()


def llguidance_tokenizer(tokenizer: Tokenizer, vocab_size: int):
    """llguidance's tokenizer: a tokenizer.json read by llguidance itself; a sentencepiece model as each
    piece's bytes (`sentencepiece_bytes`), special pieces marked as llguidance marks them, by a 0xFF byte no
    text can produce."""
    llguidance = require_extra("llguidance", "serve", "constrained decoding")
    if hasattr(tokenizer, "backend"):
        return llguidance.LLTokenizer(
            tokenizer.backend.to_str(), n_vocab=vocab_size, eos_token=tokenizer.eos_id
        )
    pieces, special = sentencepiece_bytes(tokenizer)
    spell = longest_first(pieces, special)

    class Wrapper:  # what llguidance.TokenizerWrapper reads
        eos_token_id, bos_token_id = tokenizer.eos_id, tokenizer.bos_id
        tokens = [b"\xff" + piece if index in special else piece for index, piece in enumerate(pieces)]
        special_token_ids = sorted(special)

        def __call__(self, text: str | bytes) -> list[int]:
            # the tokens' bytes must spell the text exactly, which sentencepiece's leading space would not
            return spell(text if isinstance(text, bytes) else text.encode())

    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(Wrapper()), n_vocab=vocab_size)


def sentencepiece_bytes(tokenizer: Tokenizer) -> tuple[list[bytes], set[int]]:
    """Each piece's bytes as it adds them to a text ("▁" a space, <0xNN> one byte), and the ids of the
    pieces that are no text (bos, eos, pad, llmctl's chat markers)."""
    markers = {tokenizer.piece_id(marker) for marker in CHAT_MARKERS if marker in tokenizer.pieces(marker)}
    special = {tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, *markers}
    pieces = []
    for index in range(tokenizer.vocab_size):
        piece = tokenizer.token_text(index)
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            pieces.append(bytes([int(piece[3:5], 16)]))
        else:
            pieces.append(piece.replace("\u2581", " ").encode())
    return pieces, special


def longest_first(pieces: list[bytes], special: set[int]) -> Callable[[bytes], list[int]]:
    """A tokenizer spelling bytes with the longest pieces first, left to right (a byte no piece spells is
    skipped, as a vocabulary without byte fallback drops it)."""
    ids = {piece: index for index, piece in enumerate(pieces) if index not in special and piece}
    longest = max(map(len, ids))

    def spell(text: bytes) -> list[int]:
        tokens, start = [], 0
        while start < len(text):
            end = next(
                (end for end in range(min(len(text), start + longest), start, -1) if text[start:end] in ids),
                0,
            )
            if end:
                tokens.append(ids[text[start:end]])
            start = end or start + 1
        return tokens

    return spell
