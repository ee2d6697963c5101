"""The CPU kernels' build: a build killed halfway must not hang every later model load."""

from __future__ import annotations

import subprocess
import sys

import pytest
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


@pytest.mark.parametrize("rows", [1, 3, 16])
def test_each_kernels_declared_output_matches_what_it_computes(rows):
    """The compiled decode step trusts these declarations (its wrapper checks no sizes or strides at run
    time), so each op's fake must give the real output's shape, strides and dtype, here and under dynamic
    shapes (torch.library.opcheck)."""
    assert decode_ops() is not None
    ops = torch.ops.llmctl_decode
    x = torch.randn(rows, 128)
    packed = torch.randint(0, 256, (48, 64), dtype=torch.uint8)  # two 4-bit values a byte
    calls = {
        ops.fp32_linear.default: (x, torch.randn(40, 128)),
        ops.fp32_linear_group.default: (x, [torch.randn(40, 128), torch.randn(24, 128), torch.randn(8, 128)]),
        ops.int8_linear.default: (x, torch.randint(-127, 128, (40, 128), dtype=torch.int8), torch.rand(40)),
        ops.int4_linear.default: (x, packed, torch.rand(48, 4), torch.randn(48, 4), 32),
    }
    for op, args in calls.items():
        torch.library.opcheck(
            op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
        )
