"""SHA-256 digests of files and the manifest written beside a checkpoint's files, so a truncated or altered
file is caught when the checkpoint is opened rather than as a library traceback (or silently wrong weights).

The manifest is in `sha256sum` format: `sha256sum -c checksums.sha256` checks it by hand. It covers every
file of the directory; a file that changes how the model behaves (config, generation settings, tokenizer,
chat template, adapter config, weights) and is missing from it was added afterwards, which is refused too.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
from pathlib import Path

DIGEST_FILE = "checksums.sha256"
# What decides a checkpoint's outputs; the trainer state only decides how a resumed run continues.
BEHAVIOUR_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "adapter_config.json",
    "adapter_base.json",
    "*.safetensors",
    "*.safetensors.index.json",
)
NOT_BEHAVIOUR = ("trainer_state.pt", DIGEST_FILE)
_digest_cache: dict[tuple[str, int, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """The file's SHA-256, computed once per version of the file in this process: the registry, the
    manifest check and an adapter's base check all read the same weights when a model is opened."""
    path = Path(path)
    status = path.stat()
    key = (os.path.realpath(path), status.st_ino, status.st_size, status.st_mtime_ns)
    if key not in _digest_cache:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _digest_cache[key] = digest.hexdigest()
    return _digest_cache[key]


def is_behaviour_file(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in BEHAVIOUR_FILES)


def write_digest_manifest(directory: Path) -> None:
    """Digest every file of `directory` (not subdirectories) into its manifest."""
    directory = Path(directory)
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.name != DIGEST_FILE)
    lines = [f"{file_sha256(path)}  {path.name}\n" for path in files]
    (directory / DIGEST_FILE).write_text("".join(lines))


def digest_problem(directory: Path) -> str | None:
    """What is wrong with the files of `directory` against its manifest; None when all match or when the
    directory has no manifest (a checkpoint from elsewhere, such as a downloaded Hugging Face model)."""
    directory = Path(directory)
    manifest = directory / DIGEST_FILE
    if not manifest.is_file():
        return None
    listed = set()
    for line in manifest.read_text(encoding="utf-8", errors="replace").splitlines():
        expected, _, name = line.partition("  ")
        if not name:
            return f"{DIGEST_FILE} is malformed"
        listed.add(name)
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if file_sha256(path) != expected:
            return f"{name} does not match its digest (truncated or altered)"
    added = sorted(p.name for p in directory.iterdir() if is_behaviour_file(p.name) and p.name not in listed)
    if added:
        return f"{added[0]} was added after the checkpoint was written (it is not in {DIGEST_FILE})"
    return None


def files_sha256(directory: Path) -> str:
    """One digest of every file that decides a checkpoint's behaviour (all but the trainer state): what the
    registry records, so an edited config or tokenizer is caught even when the manifest was rewritten."""
    directory = Path(directory)
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.name not in NOT_BEHAVIOUR)
    lines = "".join(f"{file_sha256(path)}  {path.name}\n" for path in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def weights_sha256(directory: Path) -> str:
    """One digest for a checkpoint's weights, whatever their sharding: a single safetensors file's own
    SHA-256 (the figure `llmctl eval --out` records as checkpoint_sha256), else the SHA-256 of the
    `sha256sum`-style lines of all of them."""
    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory} holds no .safetensors weights")
    if len(files) == 1:
        return file_sha256(files[0])
    lines = "".join(f"{file_sha256(path)}  {path.name}\n" for path in files)
    return hashlib.sha256(lines.encode()).hexdigest()
