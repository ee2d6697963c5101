"""Shared benchmark helpers: this machine's matmul peak and memory bandwidth, measured in the same run."""

from __future__ import annotations

import platform
import time

import torch


def matmul_peak_flops(sizes: tuple[int, ...] = (2048, 3072), repeats: int = 4) -> float:
    """Best fp32 GEMM FLOP/s over a few large square shapes (the ceiling MFU is quoted against)."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        started = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = max(best, 2 * n**3 * repeats / (time.perf_counter() - started))
    return best


def memory_bandwidth(bytes_: int = 1 << 30, repeats: int = 3) -> float:
    """Read bandwidth in bytes/s: summing a 1 GiB tensor (decode reads every weight once per token)."""
    data = torch.ones(bytes_ // 4)
    data.sum()
    started = time.perf_counter()
    for _ in range(repeats):
        data.sum()
    return bytes_ * repeats / (time.perf_counter() - started)


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
