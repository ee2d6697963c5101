"""`llmctl monitor [RUN_DIR ...]`: follow training runs live in a Textual dashboard."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import typer

from llmctl.errors import UserError

app = typer.Typer(add_completion=False)

DEFAULT_ROOT = Path("runs")
MONITOR_NICENESS = 19  # the lowest CPU priority: on cores that training fills, the monitor takes idle time


@app.command(name="monitor")
def monitor(
    run_dirs: list[Path] = typer.Argument(
        None,
        metavar="[RUN_DIR]...",
        help="Run directories, or folders holding runs (default: every run under runs/).",
    ),
    poll_seconds: float = typer.Option(1.0, "--poll", min=0.1, help="Seconds between reads of the files."),
) -> None:
    """Follow runs as they train: curves, throughput, samples, events; enter opens chat on a checkpoint."""
    from llmctl.train.run_log import find_runs

    roots = list(run_dirs or [DEFAULT_ROOT])
    for root in run_dirs or []:
        if not root.is_dir():
            raise UserError(f"{root} is not a directory; pass a run directory (checkpoint.dir of a recipe)")
    if not run_dirs and not (DEFAULT_ROOT.is_dir() and find_runs(roots)):
        raise UserError(
            f"no runs under {DEFAULT_ROOT}/ (no metrics.jsonl); pass a run directory, or start one with "
            "llmctl train RECIPE --tui"
        )
    app = monitor_class()(roots, poll_seconds)
    os.nice(MONITOR_NICENESS)
    app.run()


def monitor_class() -> type:
    try:
        from llmctl.tui.monitor import MonitorApp
    except ImportError as error:
        raise UserError(
            f"the monitor needs the tui extra ({error.name} is missing): pip install 'llmctl[tui]'"
        ) from None
    return MonitorApp


def train_with_monitor(
    run_dirs: list[Path], arguments: list[str], resume_arguments: list[str], show_output: bool = False
) -> int:
    """`llmctl train RECIPE --tui` (and `llmctl up --tui`): the trainer runs as a child process (`llmctl
    ARGUMENTS`) while the monitor follows its run directories; quitting the monitor asks the trainer to
    checkpoint and stop. Returns the trainer's exit code; the end of its console output is printed when it
    failed, or always with `show_output`."""
    monitor = monitor_class()  # a missing extra fails here, before training starts
    with tempfile.NamedTemporaryFile("w+") as output:
        training = subprocess.Popen(
            [sys.executable, "-m", "llmctl", *arguments],
            stdout=output,
            stderr=subprocess.STDOUT,
            text=True,
            # each line reaches the file, and the monitor's header, at once
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        os.nice(MONITOR_NICENESS)  # after the trainer started, which keeps its own priority
        app = monitor(run_dirs, training=training, training_output=Path(output.name))
        try:
            app.run()
        finally:
            if training.poll() is None and not app.stop_requested:  # the monitor failed before asking
                training.send_signal(signal.SIGINT)
                typer.echo(
                    f"waiting for the trainer to checkpoint and stop (pid {training.pid}) ...", err=True
                )
            code = training.wait()
        if code != 0 or show_output:
            output.seek(0)
            sys.stderr.write(output.read()[-4000:])
    if code == 130:
        typer.echo(f"stopped; continue with: llmctl {' '.join(resume_arguments)}", err=True)
    return code
