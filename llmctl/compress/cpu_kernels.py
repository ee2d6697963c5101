"""llmctl's weight-only CPU kernels (kernels/weight_only.cpp), compiled for this CPU on first use and cached
by torch's extension builder; the projections of up to `MAX_ROWS` rows (decode) run through them."""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import torch

MAX_ROWS = 16  # kMaxRows in the kernel; more rows (prefill) are compute-bound and go to BLAS
SOURCE = Path(__file__).with_name("kernels") / "weight_only.cpp"


@functools.cache
def weight_only_ops():
    """`torch.ops.llmctl_weight_only`, or None where it cannot be built here (no C++ compiler): the layers
    then dequantize for every product, which is correct but gives up the speed, so it is said once."""
    from torch.utils import cpp_extension

    capability = torch.backends.cpu.get_cpu_capability().lower()
    try:
        cpp_extension.load(
            name=f"llmctl_weight_only_{capability}",
            sources=[str(SOURCE)],
            # OpenMP makes ATen's parallel_for parallel; the process already holds torch's libgomp.so.1
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
    except (RuntimeError, OSError, ImportError) as error:
        warnings.warn(
            f"llmctl's quantized CPU kernels could not be compiled ({str(error).splitlines()[0]}); quantized "
            "layers will dequantize their weights for every product (slow). Install a C++ compiler (g++) "
            "and ninja to get the fast path.",
            stacklevel=2,
        )
        return None
    return torch.ops.llmctl_weight_only


def kernel_rows(x: torch.Tensor, in_features: int) -> int:
    """How many rows x has for the kernels, or 0 when they do not apply (grad, device, dtype or size)."""
    rows = x.numel() // in_features
    usable = x.device.type == "cpu" and x.dtype == torch.float32 and not x.requires_grad and rows <= MAX_ROWS
    return rows if usable and weight_only_ops() is not None else 0
