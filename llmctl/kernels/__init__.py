"""llmctl's few-row CPU kernels, compiled for this CPU on first use and cached by torch's extension builder:
the fp32, int8 and int4 projections of up to `MAX_ROWS` rows (decode) and fp32 projections of one input (q,
k and v; gate and up) as one call (few_rows.cpp), and a whole fp32 decode step of up to `MAX_ROWS` new
tokens (decode_step.cpp, llmctl.infer.fused_step)."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

MAX_ROWS = 16  # kMaxRows in the kernel; more rows (prefill) are compute-bound and go to BLAS
SOURCES = [Path(__file__).with_name(name) for name in ("few_rows.cpp", "decode_step.cpp")]
_loaded = False  # whether `decode_ops` has built and loaded them: what a compiled graph checks


@functools.cache
def decode_ops():
    """`torch.ops.llmctl_decode`, or None where it cannot be built here (no C++ compiler): projections then
    take torch's own path (quantized layers dequantize for every product), which is correct but gives up the
    speed, so it is said once."""
    from torch.utils import cpp_extension

    name = f"llmctl_decode_{torch.backends.cpu.get_cpu_capability().lower()}"
    build_directory = kernel_build_directory(name)
    try:
        with _sole_builder(build_directory):
            cpp_extension.load(
                name=name,
                sources=[str(source) for source in SOURCES],
                # OpenMP makes ATen's parallel_for parallel; the process already holds torch's libgomp.so.1
                extra_cflags=["-O3", "-march=native", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
                build_directory=str(build_directory),
                is_python_module=False,
                verbose=False,
            )
    except (RuntimeError, OSError, ImportError) as error:
        warnings.warn(
            f"llmctl's CPU decode kernels could not be compiled ({str(error).splitlines()[0]}); decoding "
            "falls back to torch's products and quantized layers dequantize their weights for every product "
            "(slow). Install a C++ compiler (g++) and ninja to get the fast path.",
            stacklevel=2,
        )
        return None
    _register_fake_kernels()
    global _loaded
    _loaded = True
    return torch.ops.llmctl_decode


def kernel_build_directory(name: str) -> Path:
    """Where the kernels are compiled and cached: torch's extensions root (TORCH_EXTENSIONS_DIR where set),
    one folder per CPU capability, Python and torch version."""
    from torch.utils import cpp_extension

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    directory = Path(root) / f"{name}-{python}-torch{torch.__version__}"
    directory.mkdir(parents=True, exist_ok=True)
    return directory


@contextlib.contextmanager
def _sole_builder(build_directory: Path) -> Iterator[None]:
    """Hold an OS lock on the build while torch builds or loads it. torch's own `lock` file outlives a build
    that was killed, and every later load then waits on it forever; the OS lock dies with its holder, so a
    `lock` file found while holding it was left by a dead build and is removed (said once)."""
    with (build_directory.parent / f"{build_directory.name}.llmctl-lock").open("w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        try:
            stale = build_directory / "lock"
            if stale.exists():
                stale.unlink()
                warnings.warn(
                    f"removed {stale}, left by a kernel build that was interrupted; building again",
                    stacklevel=3,
                )
            yield
        finally:
            fcntl.flock(guard, fcntl.LOCK_UN)


def _register_fake_kernels() -> None:
    """Output shapes for torch.compile, which traces the kernels without running them."""

    def rows_by_out(x: torch.Tensor, weight: torch.Tensor, *_: object) -> torch.Tensor:
        return x.new_empty(x.shape[0], weight.shape[0])

    for name in ("fp32_linear", "int8_linear", "int4_linear"):
        torch.library.register_fake(f"llmctl_decode::{name}")(rows_by_out)

    @torch.library.register_fake("llmctl_decode::fp32_linear_group")
    def rows_by_all_outs(x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
        return x.new_empty(x.shape[0], sum(weight.shape[0] for weight in weights))


def kernel_rows(x: torch.Tensor, in_features: int) -> int:
    """How many rows x has for the kernels, or 0 when they do not apply (grad, device, dtype or size)."""
    rows = x.numel() // in_features
    usable = x.device.type == "cpu" and x.dtype == torch.float32 and not x.requires_grad and rows <= MAX_ROWS
    if not usable:
        return 0
    # torch.compile traces this without building anything: `compile_decode` loads the kernels first
    loaded = _loaded if torch.compiler.is_compiling() else decode_ops() is not None
    return rows if loaded else 0
