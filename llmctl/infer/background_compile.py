"""Fast by default: where the fused step (llmctl.infer.fused_step) does not serve every step (quantized or
adapted layers, more rows than it takes), the compiled decode step (llmctl.infer.decode.compile_decode) is
built in a background thread while the eager step answers, and takes over between two steps once it is warmed
up, so `llmctl chat` and `llmctl serve` need no flag to reach the compiled speed and answer from the first
second.

The warm-up runs on a scratch cache with the served cache's slots and a few positions (the cache length is a
symbolic size of the compiled graphs), so the live cache is never touched. Inductor's compiled artefacts are
kept in a per-user cache directory across runs, which makes the second start's compile a fraction of the
first's."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from llmctl.infer.decode import compiled_step, use_compiled_step, warm_up_decode
from llmctl.infer.fused_step import fused_serves_all
from llmctl.model import Transformer

CACHE_VARIABLE = "TORCHINDUCTOR_CACHE_DIR"


def keep_compiled_artefacts() -> Path:
    """Inductor's cache in ~/.cache/llmctl/torchinductor (XDG_CACHE_HOME respected) unless the user set one:
    its default under /tmp is lost at a reboot."""
    if CACHE_VARIABLE not in os.environ:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        os.environ[CACHE_VARIABLE] = str(base / "llmctl" / "torchinductor")
    return Path(os.environ[CACHE_VARIABLE])


def compile_in_background(
    model: Transformer, slots: int, report: Callable[[str], None] = lambda message: None
) -> threading.Thread | None:
    """Compile and warm up `model`'s decode step for a cache of `slots` rows in a daemon thread, then swap it
    in. A failure (no C++ compiler, say) is reported and the eager step stays. The thread ends when done,
    so its OpenMP workers do not outlive it (llmctl.runtime). None, and nothing compiled, where the fused
    step (llmctl.infer.fused_step) serves every step of that many rows already."""
    if fused_serves_all(model, slots):
        return None
    keep_compiled_artefacts()

    def build() -> None:
        started = time.perf_counter()
        try:
            step = compiled_step(model)
            warm_up_decode(model, model.new_kv_cache(slots, max_len=8, slots=True), step=step)
        except Exception as error:  # the eager step goes on serving whatever went wrong here
            report(
                f"compiling the decode step failed ({type(error).__name__}: {error}); staying on the eager step"
            )
            return
        use_compiled_step(model, step)
        report(f"decode step compiled in {time.perf_counter() - started:.0f} s; generation now uses it")

    thread = threading.Thread(target=build, name="llmctl-compile", daemon=True)
    thread.start()
    return thread
