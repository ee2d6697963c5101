"""The `tokenizer.json` backend: the Hugging Face `tokenizers` file that most open Llama-architecture models
ship instead of a sentencepiece model, with its special tokens named in `tokenizer_config.json` or
`config.json` beside it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tokenizers import Tokenizer as RustTokenizer

from llmctl.data.chat_template import GENERATION_CONFIG_FILE, TEMPLATE_FILE, TEMPLATE_JSON_FILE
from llmctl.data.tokenizer_base import HF_TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, missing_piece_error
from llmctl.digests import file_sha256
from llmctl.errors import UserError

SPECIAL_ROLES = ("bos", "eos", "pad", "unk")
CHAT_TEMPLATE_FILES = (TEMPLATE_FILE, TEMPLATE_JSON_FILE, "special_tokens_map.json")
CONVENTIONAL = {"bos": ("<s>", "<|begin_of_text|>"), "eos": ("</s>", "<|end_of_text|>", "<|endoftext|>")}


def _token_text(value: object) -> str | None:
    """tokenizer_config.json writes a special token as a string or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path} is not valid JSON ({error}); restore it from the model's source") from None
    return value if isinstance(value, dict) else {}


def _read_tokenizer_file(path: Path) -> RustTokenizer:
    if not path.is_file():
        raise UserError(f"tokenizer not found: {path}")
    try:
        return RustTokenizer.from_file(str(path))
    except Exception as error:  # the Rust library raises a bare Exception for any malformed file
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"{path} is not a Hugging Face tokenizer.json ({reason})") from None


class HFTokenizer:
    """A Hugging Face `tokenizer.json`, read by the `tokenizers` library. Texts are encoded without the
    file's own post-processing (llmctl adds bos itself, as for sentencepiece)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.backend = _read_tokenizer_file(self.path)
        self.special = self._special_ids()
        if self.special.get("eos") is None:
            raise UserError(
                f"{path}: no end-of-sequence token found; name it as eos_token in "
                f"{path.parent / TOKENIZER_CONFIG_FILE}"
            )

    def _special_ids(self) -> dict[str, int | None]:
        """From tokenizer_config.json's names, else config.json's ids, else the conventional names."""
        names = _read_json(self.path.parent / TOKENIZER_CONFIG_FILE)
        model_config = _read_json(self.path.parent / "config.json")
        special: dict[str, int | None] = {}
        for role in SPECIAL_ROLES:
            text = _token_text(names.get(f"{role}_token"))
            token_id = self.backend.token_to_id(text) if text else None
            if token_id is None:
                configured = model_config.get(f"{role}_token_id")
                token_id = configured[0] if isinstance(configured, list) else configured
            if token_id is None:
                token_id = next(
                    (
                        found
                        for name in CONVENTIONAL.get(role, ())
                        if (found := self.backend.token_to_id(name)) is not None
                    ),
                    None,
                )
            special[role] = token_id
        return special

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        bos = self.special["bos"]
        return self.eos_id if bos is None else bos

    @property
    def eos_id(self) -> int:
        return self.special["eos"]  # type: ignore[return-value]  # checked in __init__

    @property
    def pad_id(self) -> int:
        pad = self.special["pad"]
        return self.eos_id if pad is None else pad

    def sha256(self) -> str:
        return file_sha256(self.path)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_with_specials(self, text: str) -> list[int]:
        """As transformers encodes by default: the post-processor's bos (Llama's) or none (Qwen's)."""
        return self.backend.encode(text, add_special_tokens=True).ids

    def encode_batch(self, texts: list[str], threads: int = 0) -> list[list[int]]:
        return [encoding.ids for encoding in self.backend.encode_batch(texts, add_special_tokens=False)]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        encoding = self.backend.encode(text, add_special_tokens=False)
        return encoding.ids, [start for start, _ in encoding.offsets]

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids, skip_special_tokens=True)

    def pieces(self, text: str) -> list[str]:
        return self.backend.encode(text, add_special_tokens=False).tokens

    def piece_id(self, piece: str) -> int:
        token_id = self.backend.token_to_id(piece)
        if token_id is None:
            raise missing_piece_error(self.path, piece)
        return token_id

    def token_text(self, token_id: int) -> str:
        return self.backend.id_to_token(token_id)

    def copy_into(self, directory: Path, model_max_length: int) -> None:
        """tokenizer.json with the config that names its special tokens (written when the source had none),
        the chat template, and the tokens that end a reply (generation_config.json's eos_token_id list): a
        model finetuned from an open base chats as the base did."""
        directory = Path(directory)
        source = self.path.parent
        shutil.copyfile(self.path, directory / HF_TOKENIZER_FILE)
        for name in CHAT_TEMPLATE_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, directory / name)
        _carry_stop_tokens(source / GENERATION_CONFIG_FILE, directory / GENERATION_CONFIG_FILE)
        source_config = source / TOKENIZER_CONFIG_FILE
        if source_config.is_file():
            shutil.copyfile(source_config, directory / TOKENIZER_CONFIG_FILE)
            return
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": model_max_length,
            **{
                f"{role}_token": self.backend.id_to_token(token_id)
                for role, token_id in self.special.items()
                if token_id is not None
            },
        }
        (directory / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def _carry_stop_tokens(source: Path, target: Path) -> None:
    """The source's eos_token_id (a list, for chat models) into the generation config written beside it."""
    stop = _read_json(source).get("eos_token_id")
    if stop is None or not target.is_file():
        return
    config = _read_json(target)
    config["eos_token_id"] = stop
    target.write_text(json.dumps(config, indent=2) + "\n")
