"""Where datatrove stages run: this machine's processes (`local`), a Ray cluster (`ray`) or Slurm array jobs
(`slurm`). Each stage is run and awaited before the next starts, so the driver can read what a stage wrote
(tallies, a --strict problem) and every executor runs the same stages in the same order.

Ray and Slurm tasks read and write the working folder beside the output: on more than one machine it must be
on a filesystem every node mounts at the same path.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from llmctl.errors import UserError, require_extra

EXECUTORS = ("local", "slurm", "ray")
SLURM_REQUIRED = ("partition", "time")  # datatrove's SlurmPipelineExecutor has no defaults for these
SPAN_BYTES = 64 << 20  # a JSONL file above this is shared between tasks (data/spans.py)
COMMON_KEYS = ("span_bytes",)  # settings llmctl reads itself; the rest go to datatrove's executor
LLMCTL_KEYS = {
    "local": COMMON_KEYS,
    "ray": (*COMMON_KEYS, "address"),
    "slurm": (*COMMON_KEYS, "poll_seconds"),
}


@dataclass(frozen=True)
class EngineSettings:
    executor: str = "local"
    tasks: int = 2  # shards of the input for the per-document stages
    workers: int = 2  # tasks running at once (local and ray)
    settings: dict | None = None  # passed to datatrove's executor as is, less LLMCTL_KEYS

    def executor_settings(self) -> dict:
        ours = LLMCTL_KEYS.get(self.executor, ())
        return {key: value for key, value in (self.settings or {}).items() if key not in ours}

    def setting(self, key: str, default: object = None) -> object:
        return (self.settings or {}).get(key, default)

    @property
    def span_bytes(self) -> int:
        return int(self.setting("span_bytes", SPAN_BYTES))


def check_executor(engine: EngineSettings) -> None:
    """Everything an executor needs, checked before any input is read: one line naming what is missing."""
    if engine.executor not in EXECUTORS:
        raise UserError(f"unknown executor {engine.executor!r}; use one of {', '.join(EXECUTORS)}")
    for key, example in (("span_bytes", "67108864"), ("poll_seconds", "30")):
        value = engine.setting(key)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int | float) or value <= 0
        ):
            raise UserError(
                f"[data.executor_settings] {key} = {value!r}: give a positive number, e.g. {example}"
            )
    if engine.executor == "ray":
        require_extra("ray", "ray", "--executor ray")
    if engine.executor == "slurm":
        missing = [key for key in SLURM_REQUIRED if engine.setting(key) is None]
        if missing:
            raise UserError(
                f"--executor slurm needs {' and '.join(missing)} in the recipe's [data.executor_settings] "
                '(for example partition = "cpu", time = "04:00:00"); pass it with --recipe'
            )
        for command in ("sbatch", "squeue"):
            if shutil.which(command) is None:
                raise UserError(f"--executor slurm: `{command}` is not on PATH; run on a Slurm login node")


@contextmanager
def engine_session(engine: EngineSettings, logs: Path) -> Iterator[None]:
    """For Ray: join the cluster at `address` (or $RAY_ADDRESS), else start one on this machine with
    `workers` CPUs, and leave it as found. The other executors need no session."""
    if engine.executor != "ray":
        yield
        return
    import ray

    if ray.is_initialized():
        yield
        return
    address = engine.setting("address") or os.environ.get("RAY_ADDRESS")
    with _stderr_to(logs / "ray.stderr"):
        try:
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                ray.init(
                    address="local", num_cpus=engine.workers, include_dashboard=False, log_to_driver=False
                )
        except (ConnectionError, RuntimeError, ValueError) as error:
            where = f"join the Ray cluster at {address}" if address else "start Ray on this machine"
            raise UserError(
                f"--executor ray: could not {where} ({error}); see {logs / 'ray.stderr'}"
            ) from None
    try:
        yield
    finally:
        with _stderr_to(logs / "ray.stderr"):
            ray.shutdown()


def run_stage(name: str, pipeline: list, tasks: int, engine: EngineSettings, work: Path) -> None:
    """Run one stage's `tasks` tasks on the engine's executor and wait for all of them; a task that did not
    finish is one line naming the stage and its logs."""
    logs = work / "logs" / name
    with _stderr_to(work / "logs" / f"{name}.stderr"):
        executor = _executor(name, pipeline, tasks, engine, logs)
        executor.run()
        if engine.executor == "slurm":
            _await_slurm(executor, tasks, float(engine.setting("poll_seconds", 30)))
    incomplete = executor.get_incomplete_ranks(range(tasks))
    if incomplete:
        raise UserError(
            f"stage {name!r}: {len(incomplete)} of {tasks} tasks did not finish; see {logs} "
            "(the working files stay there)"
        )


def _executor(name: str, pipeline: list, tasks: int, engine: EngineSettings, logs: Path):
    settings = engine.executor_settings()
    if engine.executor == "ray":
        from datatrove.executor.ray import RayPipelineExecutor

        settings.setdefault("mem_per_cpu_gb", 1)
        return RayPipelineExecutor(
            pipeline, tasks=tasks, workers=min(engine.workers, tasks), logging_dir=str(logs), **settings
        )
    if engine.executor == "slurm":
        from datatrove.executor.slurm import SlurmPipelineExecutor

        settings.setdefault("job_name", f"llmctl-{name}")
        if not {"env_command", "condaenv", "venv_path"} & settings.keys():  # the jobs run this environment
            settings["env_command"] = f"export PATH={Path(sys.executable).parent}:$PATH"
        return SlurmPipelineExecutor(pipeline, tasks=tasks, logging_dir=str(logs), **settings)
    from datatrove.executor import LocalPipelineExecutor

    settings.setdefault("start_method", "fork")  # as the embedded build's pool: no re-import of __main__
    return LocalPipelineExecutor(
        pipeline, tasks=tasks, workers=min(engine.workers, tasks), logging_dir=str(logs), **settings
    )


def _await_slurm(executor, tasks: int, poll_seconds: float) -> None:
    """Until every task is marked complete or the stage's job has left the queue (finished, failed or
    cancelled: then the caller reports the tasks that did not finish)."""
    while executor.get_incomplete_ranks(range(tasks)):
        if executor.job_id in (None, -1) or not _slurm_job_queued(str(executor.job_id)):
            return
        time.sleep(poll_seconds)


def _slurm_job_queued(job_id: str) -> bool:
    """Whether the job is still pending or running. squeue failing for any reason but an unknown (purged) job
    id, such as a busy controller, counts as queued: the build must not give up on jobs that still run."""
    listed = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%i"], capture_output=True, text=True)
    if listed.returncode != 0:
        return "Invalid job id" not in listed.stderr
    return bool(listed.stdout.strip())


@contextmanager
def _stderr_to(path: Path) -> Iterator[None]:
    """Send this process's and its task processes' stderr to `path` while a stage runs: datatrove logs every
    task's progress to stderr (its own per-task logs keep the same lines), which would bury llmctl's output."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    with path.open("a") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
