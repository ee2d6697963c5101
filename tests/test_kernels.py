"""The CPU kernels' build: a build killed halfway must not hang every later model load."""

from __future__ import annotations

import subprocess
import sys

import torch

from llmctl.kernels import decode_ops, kernel_build_directory


def test_a_lock_left_by_a_killed_build_is_removed_and_the_kernels_load():
    assert decode_ops() is not None  # built and cached by this process first
    name = f"llmctl_decode_{torch.backends.cpu.get_cpu_capability().lower()}"
    lock = kernel_build_directory(name) / "lock"  # what torch leaves when its build process dies
    lock.write_text("")
    try:
        loaded = subprocess.run(
            [sys.executable, "-c", "from llmctl.kernels import decode_ops; assert decode_ops() is not None"],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    finally:
        planted_and_left = lock.exists()
        lock.unlink(missing_ok=True)
    assert loaded.returncode == 0, loaded.stderr
    assert not planted_and_left
    assert f"removed {lock}, left by a kernel build that was interrupted" in loaded.stderr
