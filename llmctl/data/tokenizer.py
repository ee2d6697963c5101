"""Tokenizers: the sentencepiece model llmctl trains (domain terms kept whole), a second backend for the
`tokenizer.json` of Hugging Face models a user brings, and the one interface every engine uses."""

from __future__ import annotations

import io
import json
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import sentencepiece as spm

from llmctl.atomic import atomic_directory, check_output
from llmctl.data.corpus import iter_texts, read_manifest
from llmctl.data.hf_tokenizer import HFTokenizer
from llmctl.data.tokenizer_base import (
    CHAT_MARKERS,
    HF_TOKENIZER_FILE,
    MODEL_FILE,
    TOKENIZER_CONFIG_FILE,
    Tokenizer,
    missing_piece_error,
)
from llmctl.digests import file_sha256
from llmctl.errors import UserError

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
REPORT_FILE = "tokenizer_report.json"
MAX_TRAINING_SENTENCES = 2_000_000
MAX_SENTENCE_BYTES = 16384
# Blank lines are one piece: sentencepiece never merges across "\n", so otherwise each line break costs a token
# of its own. Lossless; 1-2% more text per token, and 1.6% / 0.0% / 1.4% fewer bits per byte on the quality
# benchmark's three held-out sets (benchmarks/RESULTS.md).
LAYOUT_PIECES = ("\n", "\n\n", "\n\n\n")


def open_tokenizer(path: str | Path) -> Tokenizer:
    """A `tokenizer.model` (sentencepiece) or `tokenizer.json` (Hugging Face tokenizers) file, or a directory
    holding one (a checkpoint or a downloaded model; sentencepiece first when it has both)."""
    path = Path(path)
    if path.is_dir():
        for name in (MODEL_FILE, HF_TOKENIZER_FILE):
            if (path / name).is_file():
                return open_tokenizer(path / name)
        raise UserError(f"{path} holds no tokenizer: expected {MODEL_FILE} or {HF_TOKENIZER_FILE}")
    if path.suffix == ".json":
        return HFTokenizer(path)
    return SentencePieceTokenizer(path)


class SentencePieceTokenizer:
    """sentencepiece with llmctl's special-token layout (unk 0, bos 1, eos 2, pad 3)."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"tokenizer not found: {path} (train one with llmctl tokenize train)")
        self.path = path
        try:
            self.processor = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError):
            raise UserError(
                f"{path} is not a sentencepiece model; give the tokenizer.model that llmctl tokenize train wrote"
            ) from None

    @property
    def vocab_size(self) -> int:
        return self.processor.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self.processor.bos_id()

    @property
    def eos_id(self) -> int:
        return self.processor.eos_id()

    @property
    def pad_id(self) -> int:
        return self.processor.pad_id()

    def sha256(self) -> str:
        return file_sha256(self.path)

    def encode(self, text: str) -> list[int]:
        return self.processor.encode(text)

    def encode_with_specials(self, text: str) -> list[int]:
        """As the Llama tokenizer llmctl exports for it encodes by default: a bos in front."""
        return [self.bos_id, *self.processor.encode(text)]

    def encode_batch(self, texts: list[str], threads: int = 0) -> list[list[int]]:
        return self.processor.encode(texts, num_threads=threads or -1)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        """The ids of `text` and the character offset where each begins (what a loss mask is cut by)."""
        pieces = self.processor.encode(text, return_type="proto").pieces
        char_at_byte = [0] * (len(text.encode()) + 1)
        position = 0
        for index, char in enumerate(text):
            for _ in range(len(char.encode())):
                char_at_byte[position] = index
                position += 1
        char_at_byte[position] = len(text)
        return [piece.id for piece in pieces], [char_at_byte[piece.begin] for piece in pieces]

    def decode(self, ids: list[int]) -> str:
        return self.processor.decode(ids)

    def pieces(self, text: str) -> list[str]:
        return self.processor.encode(text, out_type=str)

    def piece_id(self, piece: str) -> int:
        """The id of a piece the tokenizer must have (a chat marker, say); an error if it has not."""
        token_id = self.processor.piece_to_id(piece)
        if token_id == UNK_ID and piece != UNK:
            raise missing_piece_error(self.path, piece)
        return token_id

    def token_text(self, token_id: int) -> str:
        """The piece of an id as the vocabulary spells it (`<s>`), special ones included."""
        return self.processor.id_to_piece(token_id)

    def copy_into(self, directory: Path, model_max_length: int) -> None:
        """The model file, and a config that lets transformers' AutoTokenizer open it as a Llama tokenizer."""
        (Path(directory) / MODEL_FILE).write_bytes(self.path.read_bytes())
        config = {
            "tokenizer_class": "LlamaTokenizer",
            "bos_token": BOS,
            "eos_token": EOS,
            "unk_token": UNK,
            "pad_token": PAD,
            "add_bos_token": True,
            "add_eos_token": False,
            "model_max_length": model_max_length,
            "clean_up_tokenization_spaces": False,
        }
        (Path(directory) / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def read_domain_terms(path: Path) -> list[str]:
    if not Path(path).is_file():
        raise UserError(f"domain terms file not found: {path} (one term per line)")
    terms = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    return list(dict.fromkeys(term for term in terms if term and not term.startswith("#")))


def _training_sentences(corpus: Path) -> Iterator[str]:
    """Paragraph lines of the train split; sentencepiece learns pieces within lines, newlines are a symbol."""
    for text in iter_texts(corpus, "train"):
        for line in text.split("\n"):
            if line.strip():
                yield line[:MAX_SENTENCE_BYTES]


def train_sentencepiece(
    sentences: list[str],
    vocab_size: int,
    model_type: str,
    user_symbols: list[str],
    seed: int,
    threads: int,
    split_digits: bool = True,
) -> bytes:
    if not sentences:
        raise UserError("the corpus has no training text (its train split is empty)")
    if len(sentences) > MAX_TRAINING_SENTENCES:
        sentences = random.Random(seed).sample(sentences, MAX_TRAINING_SENTENCES)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=0.9999,
            byte_fallback=True,
            # identity keeps newlines, tabs and repeated spaces (code and chat need them) and the text as typed.
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            split_digits=split_digits,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_id=PAD_ID,
            unk_piece=UNK,
            bos_piece=BOS,
            eos_piece=EOS,
            pad_piece=PAD,
            user_defined_symbols=[*LAYOUT_PIECES, *CHAT_MARKERS, *user_symbols],
            max_sentence_length=MAX_SENTENCE_BYTES,
            num_threads=threads,
            minloglevel=2,
        )
    except RuntimeError as error:
        raise UserError(f"sentencepiece training failed: {error}") from None
    return model.getvalue()


def byte_fallback_report(processor: spm.SentencePieceProcessor, sentences: list[str], top: int = 20) -> dict:
    """Characters of the text that are no piece of the vocabulary, so each costs its UTF-8 bytes as tokens.

    Returns how many distinct characters fall back, their share of all characters, and the most frequent.
    """
    counts: Counter = Counter()
    for sentence in sentences:
        counts.update(sentence)
    unk = processor.unk_id()
    missing = {
        char: count
        for char, count in counts.items()
        if processor.piece_to_id(char.replace(" ", "\u2581")) == unk
    }
    total = sum(counts.values())
    ranked = sorted(missing.items(), key=lambda item: -item[1])
    return {
        "characters": len(missing),
        "share_of_text": sum(missing.values()) / total if total else 0.0,
        "most_frequent": [[char, count] for char, count in ranked[:top]],
    }


def fertility(processor: spm.SentencePieceProcessor, texts: list[str]) -> float:
    """Tokens per whitespace-separated word: lower means the vocabulary fits the domain better."""
    words = sum(len(text.split()) for text in texts)
    tokens = sum(len(ids) for ids in processor.encode(texts, num_threads=-1))
    return tokens / words if words else float("nan")


def train_tokenizer(
    corpus: Path,
    out: Path,
    vocab_size: int,
    model_type: str = "bpe",
    domain_terms: Path | None = None,
    seed: int = 0,
    threads: int = 0,
    split_digits: bool = True,
    overwrite: bool = False,
) -> dict:
    """Train, measure fertility on the validation split, and write `tokenizer.model` + a JSON report.

    `split_digits` makes every digit its own piece (Llama 1/2's choice). Off, numbers merge like words and
    each token carries 3% more techdocs text, yet the quality benchmark's model came out 1% worse on every
    held-out set (benchmarks/RESULTS.md), so it stays on."""
    corpus, out = Path(corpus), Path(out)
    read_manifest(corpus)
    check_output(out, [corpus, *([domain_terms] if domain_terms else [])], overwrite)
    terms = read_domain_terms(domain_terms) if domain_terms else []
    threads = threads or 2
    sentences = list(_training_sentences(corpus))
    model = train_sentencepiece(sentences, vocab_size, model_type, terms, seed, threads, split_digits)
    processor = spm.SentencePieceProcessor(model_proto=model)
    validation = list(iter_texts(corpus, "val")) or list(iter_texts(corpus, "train"))[:100]
    report = {
        "vocab_size": processor.get_piece_size(),
        "model_type": model_type,
        "split_digits": split_digits,
        "domain_terms": len(terms),
        "fertility": fertility(processor, validation),
        "byte_fallback": byte_fallback_report(processor, sentences),
        "special_tokens": {"unk": UNK_ID, "bos": BOS_ID, "eos": EOS_ID, "pad": PAD_ID},
        "chat_markers": list(CHAT_MARKERS),
        "corpus": str(corpus),
        "seed": seed,
    }
    if terms:
        baseline = spm.SentencePieceProcessor(
            model_proto=train_sentencepiece(
                sentences, vocab_size, model_type, [], seed, threads, split_digits
            )
        )
        report["fertility_without_domain_terms"] = fertility(baseline, validation)
        whole = [term for term in terms if term in processor.encode(term, out_type=str)]
        report["domain_terms_kept_whole"] = len(whole)
    with atomic_directory(out) as staging:
        (staging / MODEL_FILE).write_bytes(model)
        vocab = "\n".join(
            f"{processor.id_to_piece(i)}\t{processor.get_score(i)}" for i in range(processor.get_piece_size())
        )
        (staging / "tokenizer.vocab").write_text(vocab + "\n", encoding="utf-8")
        (staging / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report
