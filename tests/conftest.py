"""Shared fixtures: a way to run the real `llmctl` CLI in a subprocess, and paths to the bundled data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "sample"
SHARED_TECHDOCS = REPO.parent / "shared" / "data" / "techdocs"


def run_llmctl(
    *args: str, cwd: Path = REPO, pythonpath: list[Path] = (), check: bool = False, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Run `python -m llmctl ARGS` and capture its output: the CLI exactly as a user meets it."""
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([*map(str, pythonpath), env.get("PYTHONPATH", "")])
    env.setdefault("COLUMNS", "200")
    result = subprocess.run(
        [sys.executable, "-m", "llmctl", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(f"llmctl {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture
def llmctl():
    return run_llmctl
