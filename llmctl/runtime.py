"""Process-level CPU tuning that the engines apply before heavy work."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

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


def in_passing_thread(work: Callable[[], T]) -> T:
    """`work()` run in a thread that ends when it returns: its result, or its exception raised here.

    OpenMP (torch's intra-op threads, llmctl's kernels) keeps a pool of worker threads for each thread that has
    run parallel work, for as long as that thread lives. Once the pools hold more threads than the machine has
    cores, libgomp stops spinning between parallel regions and every region pays a sleep and a wake-up: a
    16.8M decode step in the serving engine's thread took 11.5 ms instead of 4.5 ms while the main thread,
    which had loaded the model, lived on with its pool. Loading in a passing thread leaves the engine's the
    only pool.
    """
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = work()
        except BaseException as error:  # re-raised in the caller's thread
            outcome["error"] = error

    thread = threading.Thread(target=run, name="llmctl-load", daemon=True)  # Ctrl-C need not wait for it
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]
