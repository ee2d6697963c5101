"""SHA-256 digests of files and the manifest written beside a checkpoint's files, so a truncated or altered
file is caught when the checkpoint is opened rather than as a library traceback (or silently wrong weights).

The manifest is in `sha256sum` format: `sha256sum -c checksums.sha256` checks it by hand.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

DIGEST_FILE = "checksums.sha256"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
    for line in manifest.read_text(encoding="utf-8", errors="replace").splitlines():
        expected, _, name = line.partition("  ")
        if not name:
            return f"{DIGEST_FILE} is malformed"
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if file_sha256(path) != expected:
            return f"{name} does not match its digest (truncated or altered)"
    return None


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
