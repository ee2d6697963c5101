"""The tokenizer a GGUF file carries, as llama.cpp reads it: a sentencepiece model's pieces, scores and types
(`tokenizer.ggml.model = llama`), or a byte-level BPE `tokenizer.json`'s tokens, types and merges
(`gpt2`) with the name of its pre-tokenizer, which llama.cpp knows by name rather than by regex.

The pre-tokenizer is recognised from the file's own description (its split pattern and byte-level
settings), never guessed: a tokenizer.json whose pre-tokenizer matches none that llama.cpp names is refused,
since llama.cpp would then split text differently from the model's own tokenizer."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from llmctl.errors import UserError

# The split patterns of the Llama 3 and Qwen2 tokenizer.json files (tiktoken-style: digits in threes or
# one by one); llama.cpp names them "llama-bpe" and "qwen2".
_LETTERS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_REST = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
SPLIT_PATTERNS = {_LETTERS + r"\p{N}{1,3}" + _REST: "llama-bpe", _LETTERS + r"\p{N}" + _REST: "qwen2"}


@dataclass
class Vocabulary:
    """What `GGUFWriter` records of a tokenizer."""

    model: str  # llama.cpp's tokenizer kind: "llama" (sentencepiece) or "gpt2" (byte-level BPE)
    tokens: list[bytes]
    types: list[int]
    scores: list[float] = field(default_factory=list)  # sentencepiece only
    merges: list[str] = field(default_factory=list)  # BPE only
    pre: str | None = None  # BPE only: llama.cpp's pre-tokenizer name
    space_prefix: bool = False
    add_bos: bool = True
    unknown_id: int | None = None


def read_vocabulary(gguf, tokenizer_file: Path, vocab_size: int) -> Vocabulary:
    """The vocabulary of a tokenizer.model or tokenizer.json, padded with unused tokens to the model's
    embedding count."""
    path = Path(tokenizer_file)
    vocabulary = _bpe(gguf, path) if path.suffix == ".json" else _sentencepiece(path)
    if len(vocabulary.tokens) > vocab_size:
        raise UserError(
            f"{path} has {len(vocabulary.tokens)} tokens but the model embeds {vocab_size}; "
            "the checkpoint and its tokenizer do not belong together"
        )
    for index in range(len(vocabulary.tokens), vocab_size):
        vocabulary.tokens.append(f"[PAD{index}]".encode())
        vocabulary.types.append(int(gguf.TokenType.UNUSED))
        if vocabulary.model == "llama":
            vocabulary.scores.append(-1000.0)
    return vocabulary


def _sentencepiece(path: Path) -> Vocabulary:
    """Pieces, scores and types: sentencepiece's type numbers are llama.cpp's."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    return Vocabulary(
        model="llama",
        tokens=[piece.piece.encode() for piece in proto.pieces],
        types=[int(piece.type) for piece in proto.pieces],
        scores=[piece.score for piece in proto.pieces],
        space_prefix=proto.normalizer_spec.add_dummy_prefix,
        unknown_id=proto.trainer_spec.unk_id,
    )


def _bpe(gguf, path: Path) -> Vocabulary:
    spec = json.loads(path.read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise UserError(
            f"{path} is a {model.get('type')} tokenizer; GGUF export writes byte-level BPE or sentencepiece"
        )
    pre = pre_tokenizer_name(spec.get("pre_tokenizer"))
    if pre is None:
        raise UserError(
            f"{path}: its pre-tokenizer ({json.dumps(spec.get('pre_tokenizer'))[:120]}) is none that llama.cpp "
            "names (gpt-2, smollm, llama-bpe, qwen2), so llama.cpp would split text differently; "
            "GGUF export of this tokenizer is not supported"
        )
    by_id = {token_id: text for text, token_id in model["vocab"].items()}
    kinds = {token_id: int(gguf.TokenType.NORMAL) for token_id in by_id}
    for added in spec.get("added_tokens") or []:
        by_id[added["id"]] = added["content"]
        kinds[added["id"]] = int(
            gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        )
    count = max(by_id) + 1
    tokens = [by_id.get(index, f"[PAD{index}]").encode() for index in range(count)]
    types = [kinds.get(index, int(gguf.TokenType.UNUSED)) for index in range(count)]
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model.get("merges") or []]
    unknown = model.get("unk_token")
    return Vocabulary(
        model="gpt2",
        tokens=tokens,
        types=types,
        merges=merges,
        pre=pre,
        add_bos=_adds_bos(spec, path),
        unknown_id=model["vocab"].get(unknown) if unknown else None,
    )


def pre_tokenizer_name(spec: dict | None) -> str | None:
    """llama.cpp's name for a tokenizer.json pre-tokenizer, or None when it is none llama.cpp knows."""
    if not spec:
        return None
    parts = spec.get("pretokenizers", []) if spec.get("type") == "Sequence" else [spec]
    kinds = [part.get("type") for part in parts]
    byte_level = parts[-1] if kinds and kinds[-1] == "ByteLevel" else None
    if byte_level is None or byte_level.get("add_prefix_space"):
        return None
    splits = byte_level.get("use_regex", True)
    if kinds == ["ByteLevel"] and splits:
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and splits:
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not splits and parts[0].get("behavior") == "Isolated":
        return SPLIT_PATTERNS.get((parts[0].get("pattern") or {}).get("Regex"))
    return None


def pre_tokenizer_spec(name: str) -> dict | None:
    """The tokenizer.json pre-tokenizer llama.cpp's `name` stands for (what `pre_tokenizer_name` reads
    back), or None for a name llmctl does not know."""
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    if name == "gpt-2":
        return byte_level
    if name == "smollm":
        digits = {"type": "Digits", "individual_digits": True}
        return {"type": "Sequence", "pretokenizers": [digits, byte_level]}
    pattern = next((regex for regex, known in SPLIT_PATTERNS.items() if known == name), None)
    if pattern is None:
        return None
    split = {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}
    return {"type": "Sequence", "pretokenizers": [split, byte_level | {"use_regex": False}]}


def _adds_bos(spec: dict, path: Path) -> bool:
    """Whether the tokenizer puts bos before a text: tokenizer_config.json's add_bos_token where it says,
    else whether the post-processor's template starts with a special token."""
    config_file = path.parent / "tokenizer_config.json"
    if config_file.is_file():
        stated = json.loads(config_file.read_text(encoding="utf-8")).get("add_bos_token")
        if isinstance(stated, bool):
            return stated
    processor = spec.get("post_processor") or {}
    steps = processor.get("processors", []) if processor.get("type") == "Sequence" else [processor]
    for step in steps:
        if step.get("type") == "TemplateProcessing":
            single = step.get("single") or [{}]
            return "SpecialToken" in single[0]
    return False
