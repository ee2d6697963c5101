"""llmctl's few-row CPU kernels (few_rows.cpp), compiled for this CPU on first use and cached by torch's
extension builder: the fp32, int8 and int4 projections of up to `MAX_ROWS` rows (decode) run through them."""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import torch

MAX_ROWS = 16  # kMaxRows in the kernel; more rows (prefill) are compute-bound and go to BLAS
SOURCE = Path(__file__).with_name("few_rows.cpp")
_loaded = False  # whether `decode_ops` has built and loaded them: what a compiled graph checks


@functools.cache
def decode_ops():
    """`torch.ops.llmctl_decode`, or None where it cannot be built here (no C++ compiler): projections then
    take torch's own path (quantized layers dequantize for every product), which is correct but gives up the
    speed, so it is said once."""
    from torch.utils import cpp_extension

    capability = torch.backends.cpu.get_cpu_capability().lower()
    try:
        cpp_extension.load(
            name=f"llmctl_decode_{capability}",
            sources=[str(SOURCE)],
            # OpenMP makes ATen's parallel_for parallel; the process already holds torch's libgomp.so.1
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
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


def _register_fake_kernels() -> None:
    """Output shapes for torch.compile, which traces the kernels without running them."""

    def rows_by_out(x: torch.Tensor, weight: torch.Tensor, *_: object) -> torch.Tensor:
        return x.new_empty(x.shape[0], weight.shape[0])

    for name in ("fp32_linear", "int8_linear", "int4_linear"):
        torch.library.register_fake(f"llmctl_decode::{name}")(rows_by_out)


def kernel_rows(x: torch.Tensor, in_features: int) -> int:
    """How many rows x has for the kernels, or 0 when they do not apply (grad, device, dtype or size)."""
    rows = x.numel() // in_features
    usable = x.device.type == "cpu" and x.dtype == torch.float32 and not x.requires_grad and rows <= MAX_ROWS
    if not usable:
        return 0
    # torch.compile traces this without building anything: `compile_decode` loads the kernels first
    loaded = _loaded if torch.compiler.is_compiling() else decode_ops() is not None
    return rows if loaded else 0
