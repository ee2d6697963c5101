"""Who owns a run directory, and which checkpoint a resume may continue from.

A run directory belongs to one run: a fresh run never writes into one that holds another (its pruning would
delete the other's checkpoints and its metrics would interleave); `--overwrite` starts clean on purpose.
Two trainers started together on one directory are kept apart by an OS lock held for the run's life, taken
before the directory is checked, so the check and the claim cannot interleave.
A resume takes the newest checkpoint that verifies, and refuses a recipe that would make it inexact.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import time
import tomllib
from collections.abc import Callable
from pathlib import Path

from llmctl.atomic import remove_stale_staging
from llmctl.checkpoint import (
    RECIPE_FILE,
    TRAINER_STATE_FILE,
    checkpoint_problem,
    list_checkpoints,
)
from llmctl.errors import UserError
from llmctl.recipe import Recipe, recipe_from_dict
from llmctl.registry.mlflow_client import TRAINING_RUN_FILE
from llmctl.train.run_log import METRICS_FILE, RANKS_DIR

RUN_OUTPUTS = (
    "checkpoints",
    METRICS_FILE,
    RANKS_DIR,
    "tensorboard",
    "train.log",
    TRAINING_RUN_FILE,
)  # recipe.toml is rewritten


LOCK_FILE = ".lock"  # holds the PID of the process running in the directory, while it runs


class RunLock:
    """An exclusive `flock` on the run directory's lock file; the kernel drops it when the holder exits,
    however it exits, so a killed run never leaves the directory locked."""

    def __init__(self, run_dir: Path) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / LOCK_FILE
        self.handle = path.open("a+")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder()
            self.handle.close()
            raise UserError(
                f"{run_dir} is in use by another run (PID {holder}); wait for it to finish, stop it, or set "
                "checkpoint.dir to a new directory"
            ) from None
        self._write(f"{os.getpid()}\n")

    def _holder(self) -> str:
        """The holder's PID, which it writes just after locking: wait a moment for it if it is not there yet."""
        for _ in range(50):
            self.handle.seek(0)
            if holder := self.handle.read().strip():
                return holder
            time.sleep(0.002)
        return "unknown"

    def _write(self, text: str) -> None:
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(text)
        self.handle.flush()

    def release(self) -> None:
        """Unlock, leaving the file empty: it names a holder only while one holds it."""
        self._write("")
        self.handle.close()


def holds_a_run(run_dir: Path) -> bool:
    return bool(list_checkpoints(run_dir)) or (run_dir / METRICS_FILE).is_file()


def check_run_dir(run_dir: Path, resume: str | None, overwrite: bool) -> None:
    """Refuse to start a fresh run over another one unless `overwrite` (read-only: safe on any process)."""
    run_dir = Path(run_dir)
    if resume is not None and overwrite:
        raise UserError("--resume and --overwrite contradict each other: pick one")
    if resume is None and not overwrite and holds_a_run(run_dir):
        steps = [step for step, _ in list_checkpoints(run_dir)]
        held = f"checkpoints up to step {steps[-1]}" if steps else METRICS_FILE
        raise UserError(
            f"{run_dir} holds an earlier run ({held}); pass --resume auto to continue it, --overwrite "
            "to start over (deleting it), or set checkpoint.dir to a new directory"
        )


def claim_run_dir(run_dir: Path, resume: str | None, overwrite: bool) -> RunLock:
    """Lock the directory, `check_run_dir`, then clear an earlier run if `overwrite` said to, and remove the
    staging a killed checkpoint save left. One process (rank 0) claims, and releases the lock at the end."""
    run_dir = Path(run_dir)
    lock = RunLock(run_dir)
    try:
        check_run_dir(run_dir, resume, overwrite)
        if resume is None and overwrite:
            for name in RUN_OUTPUTS:
                path = run_dir / name
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
        remove_stale_staging(run_dir / "checkpoints")
    except BaseException:
        lock.release()
        raise
    return lock


def resume_checkpoint(
    run_dir: Path, resume: str | None, on_rejected: Callable[[Path, str], None]
) -> Path | None:
    """The checkpoint to continue from. `auto` takes the newest one that verifies, reporting each newer one
    it had to pass over; a path the user named must verify itself."""
    if resume is None:
        return None
    if resume != "auto":
        path = Path(resume)
        problem = training_checkpoint_problem(path)
        if problem:
            raise UserError(f"--resume {resume}: cannot resume from it: {problem}")
        return path
    for _, path in reversed(list_checkpoints(run_dir)):
        problem = training_checkpoint_problem(path)
        if problem is None:
            return path
        on_rejected(path, problem)
    return None


def training_checkpoint_problem(path: Path) -> str | None:
    if not (path / TRAINER_STATE_FILE).is_file():
        return f"not a training checkpoint (no {TRAINER_STATE_FILE})"
    return checkpoint_problem(path)


def exactness_keys(recipe: Recipe, data_fingerprint: str) -> dict[str, object]:
    """What a resumed run must share with the run it continues for the result to equal an uninterrupted
    run: the model's shape, the seed, the windows each step sees, and the data itself."""
    keys: dict[str, object] = {f"model.{key}": value for key, value in recipe.model.model_dump().items()}
    keys["train.seed"] = recipe.train.seed
    keys["train.seq_len"] = recipe.seq_len
    keys["train.global_batch_size"] = recipe.train.global_batch_size
    keys["train.document_masking"] = recipe.train.document_masking
    keys["data.tokens (content)"] = data_fingerprint
    return keys


def check_resume_matches(checkpoint: Path, recipe: Recipe, data_fingerprint: str, saved: dict) -> None:
    """Refuse to resume under a recipe that changes what `exactness_keys` names or the optimizer; anything
    else (steps, lr, logging, checkpointing) may change."""
    recipe_path = checkpoint / RECIPE_FILE
    if not recipe_path.is_file():
        return
    before = recipe_from_dict(tomllib.loads(recipe_path.read_text()), source=str(recipe_path))
    old = exactness_keys(before, saved.get("data_fingerprint", data_fingerprint))
    new = exactness_keys(recipe, data_fingerprint)
    # the saved moments belong to one optimizer; checkpoints from before the choice existed hold AdamW's
    old["optim.name"], new["optim.name"] = saved.get("optimizer_name", "adamw"), recipe.optim.name
    changed = [key for key in new if old.get(key) != new[key]]
    if changed:
        details = ", ".join(
            f"{key} {old.get(key)} -> {new[key]}" if "content" not in key else f"{key} changed"
            for key in changed
        )
        raise UserError(
            f"cannot resume from {checkpoint}: the recipe changed what an exact resume needs ({details}); "
            "restore those keys, or start a new run (--overwrite or a new checkpoint.dir)"
        )
