"""Process-level CPU tuning that the engines apply before heavy work."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch

# glibc mallopt parameters
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4

_tuned = False


def keep_freed_memory() -> bool:
    """Stop glibc from returning every large tensor's pages to the OS on free.

    By default each allocation above 32 MB (logits, their gradients) is a fresh mmap whose pages fault in
    and get zeroed on first touch: ~10% of a small-model CPU training step. Serving allocations from the
    heap and never trimming it makes steady-state steps reuse warm pages. Returns whether it applied.
    """
    global _tuned
    if _tuned:
        return True
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        applied = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    _tuned = applied
    return applied


@contextmanager
def decode_threads(device: torch.device) -> Iterator[None]:
    """Run torch single-threaded for CPU decode steps.

    A decode step is a chain of tiny ops and memory-bound projections: torch's intra-op threads only add
    synchronisation, and their spinning starves the BLAS threads that stream the weights
    (llmctl.model.layers.linear). Switching costs well under a microsecond.
    """
    if device.type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
