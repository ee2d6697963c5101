"""Training runs a user can trust: a run directory is never taken over, checkpoints are verified and skipped
when damaged, a killed run resumes to the bitwise result of an uninterrupted one, and nothing half-written
is left behind."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomli_w
import torch
from conftest import REPO, free_port, tiny_recipe_dict

from llmctl.atomic import atomic_directory, remove_stale_staging
from llmctl.checkpoint import list_checkpoints
from llmctl.digests import DIGEST_FILE
from llmctl.errors import UserError
from llmctl.model.hf_format import WEIGHTS_FILE, read_state_dict
from llmctl.recipe import recipe_from_dict
from llmctl.train.distributed import DistributedContext
from llmctl.train.metrics import read_metrics
from llmctl.train.trainer import Trainer

CPU = DistributedContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def write_recipe(path: Path, pipeline, run_dir: Path, **train) -> Path:
    recipe = tiny_recipe_dict(pipeline, run_dir, **train)
    path.write_text(tomli_w.dumps(recipe))
    return path


def snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
    }


def step_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if r["event"] == "step"}


def test_a_run_directory_holding_another_run_is_never_taken_over(
    sample_pipeline, tmp_path, llmctl_in_process
):
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "recipe.toml", sample_pipeline, run, steps=4)
    llmctl_in_process("train", str(recipe), check=True)
    before = snapshot(run)

    refused = llmctl_in_process("train", str(recipe))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    (line,) = refused.stderr.strip().splitlines()
    assert "holds an earlier run" in line and "--resume auto" in line and "--overwrite" in line
    assert snapshot(run) == before  # nothing deleted, nothing appended

    contradiction = llmctl_in_process("train", str(recipe), "--resume", "auto", "--overwrite")
    assert contradiction.returncode == 2 and snapshot(run) == before

    llmctl_in_process("train", str(recipe), "--overwrite", check=True)
    records = read_metrics(run)
    assert [r["event"] for r in records].count("started") == 1  # a clean start, not an append


def test_pruning_keeps_checkpoints_newer_than_the_run_it_belongs_to(sample_pipeline, tmp_path):
    run = tmp_path / "run"
    Trainer(recipe_from_dict(tiny_recipe_dict(sample_pipeline, run, steps=8)), CPU).fit()
    assert [step for step, _ in list_checkpoints(run)] == [4, 8]
    branch = recipe_from_dict(tiny_recipe_dict(sample_pipeline, run, steps=8))
    branch.checkpoint.every, branch.checkpoint.keep_last = 1, 1
    branch.train.steps = 6
    newest_before = snapshot(run / "checkpoints" / "step-00000008")
    Trainer(branch, CPU).fit(resume=str(run / "checkpoints" / "step-00000004"))
    # keep_last=1 pruned its own 4 and 5, but the older run's step 8 is not this run's to delete
    assert [step for step, _ in list_checkpoints(run)] == [6, 8]
    assert snapshot(run / "checkpoints" / "step-00000008") == newest_before


def test_metrics_are_appended_and_a_torn_last_line_is_tolerated(sample_pipeline, tmp_path):
    run = tmp_path / "run"
    first = Trainer(recipe_from_dict(tiny_recipe_dict(sample_pipeline, run, steps=8)), CPU)

    def stop_after_six(event):
        if getattr(event, "step", 0) == 6 and event.kind == "step":
            first.stop_requested = True

    first.on_event = stop_after_six
    first.fit()
    metrics = run / "metrics.jsonl"
    with metrics.open("a") as handle:
        handle.write('{"event": "step", "step": 7, "lo')  # what a crash mid-write leaves
    before = metrics.read_bytes()
    Trainer(recipe_from_dict(tiny_recipe_dict(sample_pipeline, run, steps=8)), CPU).fit(resume="auto")
    assert metrics.read_bytes().startswith(before)  # appended, never rewritten
    assert sorted(step_losses(run)) == list(range(1, 9))


def test_resume_refuses_a_recipe_that_voids_exactness_and_allows_the_rest(
    sample_pipeline, tmp_path, llmctl_in_process
):
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "recipe.toml", sample_pipeline, run, steps=4)
    llmctl_in_process("train", str(recipe), check=True)
    before = snapshot(run)
    for overrides, keys in (
        (["--set", "model.d_model=96"], ["model.d_model 64 -> 96"]),
        (
            ["--set", "train.seed=7", "--set", "train.global_batch_size=4"],
            ["train.seed", "global_batch_size"],
        ),
    ):
        result = llmctl_in_process(
            "train", str(recipe), "--resume", "auto", "--set", "train.steps=6", *overrides
        )
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        (line,) = result.stderr.strip().splitlines()
        assert "exact resume" in line and all(key in line for key in keys), line
        assert snapshot(run) == before
    allowed = llmctl_in_process(
        "train", str(recipe), "--resume", "auto", "--set", "train.steps=6", "--set", "optim.lr=1e-3"
    )
    assert allowed.returncode == 0, allowed.stderr
    assert [step for step, _ in list_checkpoints(run)][-1] == 6


def test_a_damaged_checkpoint_is_one_line_in_chat_serve_and_eval(sample_pipeline, tmp_path, llmctl):
    result = Trainer(
        recipe_from_dict(tiny_recipe_dict(sample_pipeline, tmp_path / "run", steps=4)), CPU
    ).fit()
    weights = result.checkpoint / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    for command in (
        ["chat", str(result.checkpoint), "--plain"],
        ["serve", str(result.checkpoint), "--port", str(free_port())],
        ["eval", str(result.checkpoint), "--suite", "domain"],
    ):
        outcome = llmctl(*command, timeout=120)
        assert outcome.returncode == 2 and "Traceback" not in outcome.stderr, outcome.stderr
        (line,) = outcome.stderr.strip().splitlines()
        assert "model.safetensors does not match its digest" in line, line
    (result.checkpoint / DIGEST_FILE).unlink()  # a directory from elsewhere has no manifest
    outcome = llmctl("chat", str(result.checkpoint), "--plain")
    assert outcome.returncode == 2 and "Traceback" not in outcome.stderr, outcome.stderr
    assert "cannot load checkpoint" in outcome.stderr


def test_a_full_disk_during_a_save_is_one_error_and_earlier_checkpoints_survive(
    sample_pipeline, tmp_path, monkeypatch
):
    import shutil

    import llmctl.checkpoint

    run = tmp_path / "run"
    trainer = Trainer(recipe_from_dict(tiny_recipe_dict(sample_pipeline, run, steps=8)), CPU)
    saved = {}

    def fill_the_disk_after_the_first_save(event):
        if event.kind == "checkpoint" and not saved:
            saved.update(snapshot(Path(event.path)))

            def torch_save_on_a_full_disk(*args, **kwargs):
                raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1472 vs 1368")

            usage = shutil.disk_usage(tmp_path)
            monkeypatch.setattr(llmctl.checkpoint.torch, "save", torch_save_on_a_full_disk)
            monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=4096))

    trainer.on_event = fill_the_disk_after_the_first_save
    with pytest.raises(UserError, match="no space left on the disk") as error:
        trainer.fit()
    assert "--resume auto" in str(error.value)
    ((step, checkpoint),) = list_checkpoints(run)
    assert step == 4 and snapshot(checkpoint) == saved  # the earlier checkpoint is whole
    assert not [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # no staging


def test_stale_staging_is_removed_and_a_retired_directory_without_its_replacement_restored(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f".step-00000004.tmp-{dead.pid}").mkdir()
    (tmp_path / f".step-00000004.tmp-{dead.pid}" / "partial").write_text("x")
    (tmp_path / f".step-00000002.old-{dead.pid}").mkdir()  # killed between the two renames
    (tmp_path / f".step-00000002.old-{dead.pid}" / "model").write_text("kept")
    (tmp_path / f".step-00000009.tmp-{os.getppid()}").mkdir()  # a live writer's staging stays
    remove_stale_staging(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f".step-00000009.tmp-{os.getppid()}",
        "step-00000002",
    ]
    assert (tmp_path / "step-00000002" / "model").read_text() == "kept"


def test_a_directory_is_flushed_to_disk_before_it_is_renamed_into_place(tmp_path, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(descriptor: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{descriptor}"))
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    with atomic_directory(tmp_path / "out") as staging:
        (staging / "weights").write_bytes(b"w" * 100)
        (staging / "nested").mkdir()
        (staging / "nested" / "config").write_text("{}")
        staged = str(staging)
    assert f"{staged}/weights" in synced and f"{staged}/nested/config" in synced
    assert staged in synced and str(tmp_path) in synced  # the directory entries too
    assert synced.index(staged) > synced.index(f"{staged}/weights")


def _train(recipe: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "llmctl", "train", str(recipe), *args],
        cwd=REPO,
        env={**os.environ, "COLUMNS": "1000"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _kill_inside_a_save(process: subprocess.Popen, checkpoints: Path) -> bool:
    """SIGKILL the moment this process's checkpoint staging directory exists (its save is under way)."""
    deadline, staging = time.monotonic() + 120, f".tmp-{process.pid}"
    while process.poll() is None and time.monotonic() < deadline:
        if checkpoints.is_dir() and any(name.endswith(staging) for name in os.listdir(checkpoints)):
            process.send_signal(signal.SIGKILL)
            process.wait()
            return True
    return False


def _kill_after_steps(process: subprocess.Popen, run: Path, steps: int, jitter: float) -> None:
    """SIGKILL `jitter` seconds after step `steps` is logged, or at step `steps + 2` if that comes first: on a
    fast machine the jitter alone can outlast the rest of the run, which then leaves nothing to resume."""
    deadline, kill_at = time.monotonic() + 120, None
    while process.poll() is None and time.monotonic() < deadline:
        logged = max(step_losses(run), default=0) if (run / "metrics.jsonl").is_file() else 0
        if kill_at is None and logged >= steps:
            kill_at = time.monotonic() + jitter
        if kill_at is not None and (time.monotonic() >= kill_at or logged >= steps + 2):
            break
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_ends_bitwise_equal(sample_pipeline, tmp_path):
    steps = 16
    reference = recipe_from_dict(tiny_recipe_dict(sample_pipeline, tmp_path / "straight", steps=steps))
    reference.checkpoint.every = 1
    Trainer(reference, CPU).fit()

    run = tmp_path / "chaos"
    recipe = write_recipe(tmp_path / "chaos.toml", sample_pipeline, run, steps=steps)
    recipe.write_text(
        recipe.read_text().replace("every = 4", "every = 1").replace("keep_last = 5", "keep_last = 3")
    )
    checkpoints = run / "checkpoints"
    rng = random.Random(0)

    assert _kill_inside_a_save(_train(recipe), checkpoints), "the run ended before a save was caught"
    assert any(".tmp-" in name for name in os.listdir(checkpoints))  # the killed save's staging is there
    _kill_after_steps(_train(recipe, "--resume", "auto"), run, 6, rng.uniform(0, 0.3))
    assert _kill_inside_a_save(_train(recipe, "--resume", "auto"), checkpoints)
    _kill_after_steps(_train(recipe, "--resume", "auto"), run, 10, rng.uniform(0, 0.3))

    (newest_step, newest), *_ = reversed(list_checkpoints(run))
    weights = newest / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:1000])  # a disk that lost the end of the newest save
    final = _train(recipe, "--resume", "auto")
    stdout, stderr = final.communicate(timeout=300)
    assert final.returncode == 0, stderr
    assert f"skipped the damaged checkpoint {newest}" in stdout
    assert "model.safetensors does not match its digest" in stdout

    assert not [name for name in os.listdir(checkpoints) if name.startswith(".")]  # no staging left
    assert step_losses(run) == step_losses(tmp_path / "straight")  # exact, step for step
    ours = read_state_dict(list_checkpoints(run)[-1][1])
    theirs = read_state_dict(list_checkpoints(tmp_path / "straight")[-1][1])
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    rejected = [r for r in read_metrics(run) if r["event"] == "checkpoint_rejected"]
    assert [r["path"] for r in rejected] == [str(newest)] and newest_step > rejected[0]["step"]
