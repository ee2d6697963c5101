"""Write a directory completely or not at all: build it beside the target, then rename it into place."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from llmctl.errors import UserError


def staging_path(target: Path) -> Path:
    return target.parent / f".{target.name}.tmp-{os.getpid()}"


@contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a temporary directory that replaces `target` only if the block finishes without error."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_path(target)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if target.exists():
        retired = target.parent / f".{target.name}.old-{os.getpid()}"
        target.rename(retired)
        staging.rename(target)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        staging.rename(target)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file completely or not at all: a reader sees the old contents or the new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_path(path)
    try:
        staging.write_text(text, encoding="utf-8")
        staging.replace(path)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise


def check_output(out: Path, inputs: Iterable[Path], overwrite: bool) -> None:
    """The rule for every command that writes a directory: the output never is, contains or lies inside one
    of its inputs (replacing it would delete them), and an existing non-empty output is replaced only when
    the user passed --overwrite."""
    target = Path(out).resolve()
    for source in inputs:
        source_path = Path(source).resolve()
        if target == source_path or target in source_path.parents or source_path in target.parents:
            raise UserError(f"--out {out} overlaps the input {source}; write the output somewhere else")
    if target.exists() and not overwrite and (not target.is_dir() or any(target.iterdir())):
        raise UserError(f"{out} already exists; pass --overwrite to replace it")
