"""Write a directory completely or not at all: build it beside the target, make it durable, then rename it
into place. A process killed half-way leaves a hidden staging directory, which the next write beside it
removes (or, for a replaced directory whose new copy never arrived, restores)."""

from __future__ import annotations

import errno
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from llmctl.errors import UserError

STAGING = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)$")


def staging_path(target: Path) -> Path:
    return target.parent / f".{target.name}.tmp-{os.getpid()}"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging(directory: Path) -> None:
    """Clean up after writers in `directory` that were killed: their half-built staging copies are removed,
    and a directory retired for replacement whose new copy never arrived is put back. Staging of live
    processes is left alone."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for child in directory.iterdir():
        match = STAGING.match(child.name)
        if not match or int(match["pid"]) == os.getpid() or _process_alive(int(match["pid"])):
            continue
        original = directory / match["name"]
        if match["kind"] == "old" and not original.exists():
            child.rename(original)
        elif child.is_dir():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def fsync_tree(directory: Path) -> None:
    """Flush every file below `directory`, and the directories themselves, to stable storage: without it a
    power cut after the rename can leave empty files in a directory that looks complete."""
    for root, _, files in os.walk(directory):
        for name in files:
            _fsync_path(Path(root) / name)
        _fsync_path(Path(root))


def _fsync_path(path: Path) -> None:
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    descriptor = os.open(path, flags)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a temporary directory that replaces `target` only if the block finishes without error."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target.parent)
    staging = staging_path(target)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        share_like_the_rest(staging)
        fsync_tree(staging)
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
    _fsync_path(target.parent)


def share_like_the_rest(directory: Path) -> None:
    """Give files a writer created private (safetensors writes weights 0600) the mode every other file of
    the directory gets, 0666 less the umask: a checkpoint is not half readable by the team that shares it."""
    mask = os.umask(0o022)
    os.umask(mask)
    for path in directory.rglob("*"):
        if path.is_file() and not path.stat().st_mode & 0o077:
            path.chmod(0o666 & ~mask)


LOW_SPACE_BYTES = 64 << 20
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def disk_full(error: BaseException, directory: Path) -> bool:
    """Whether a failed write ran out of space: an ENOSPC/EDQUOT error, or a library error (torch's zip
    writer says only `unexpected pos`) raised while the disk holding `directory` is all but full."""
    if isinstance(error, OSError) and error.errno in NO_SPACE_ERRNOS:
        return True
    try:
        return shutil.disk_usage(directory).free < LOW_SPACE_BYTES
    except OSError:
        return False


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file completely or not at all: a reader sees the old contents or the new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_path(path)
    try:
        with staging.open("w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
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
