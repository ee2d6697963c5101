"""The CPU decode fast path: an explicit swap made when a model is loaded for inference.

At a handful of rows a projection is memory-bound: torch's CPU sgemv/sgemm streams weights at about a third
of this machine's bandwidth where numpy's OpenBLAS reaches nearly all of it (benchmarks/RESULTS.md). So
`use_numpy_blas` replaces each plain `nn.Linear` with a `NumpyBlasLinear` that shares its parameters, and
the few-row forwards of inference run with torch single-threaded (`few_row_threads`): torch's spinning
OpenMP threads would otherwise fight OpenBLAS's for the two cores. Training never sees either.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

SKINNY_ROWS = 64


class NumpyBlasLinear(nn.Linear):
    """`nn.Linear` whose few-row, gradient-free fp32 CPU products go through numpy's BLAS."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if (
            rows <= SKINNY_ROWS
            and self.bias is None
            and not torch.is_grad_enabled()
            and x.device.type == "cpu"
            and x.dtype == self.weight.dtype == torch.float32
        ):
            flat = x.reshape(rows, x.shape[-1]).numpy()
            product = flat @ self.weight.detach().numpy().T
            return torch.from_numpy(product).view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)


def use_numpy_blas(model: nn.Module) -> int:
    """Swap every plain `nn.Linear` of a CPU fp32 model for a `NumpyBlasLinear` over the same parameters.

    Subclasses and wrappers (LoRA, quantized or pruned linears) keep their own forward. Returns the number
    of modules swapped (0 for a model on another device or dtype).
    """
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            plain_cpu_fp32 = type(child) is nn.Linear and child.weight.device.type == "cpu"
            if not plain_cpu_fp32 or child.weight.dtype != torch.float32:
                continue
            fast = NumpyBlasLinear(child.in_features, child.out_features, bias=False, device="meta")
            fast.weight, fast.bias = child.weight, child.bias  # shared, so a tied head stays tied
            setattr(parent, name, fast)
            swapped += 1
    return swapped


@contextmanager
def few_row_threads(device: torch.device, rows: int) -> Iterator[None]:
    """Run torch single-threaded for a CPU forward of at most SKINNY_ROWS rows (decode steps, short prompts).

    Such a forward is a chain of tiny ops and memory-bound projections: torch's intra-op threads only add
    synchronisation and starve the BLAS threads that stream the weights. Switching costs under a microsecond.
    """
    if device.type != "cpu" or rows > SKINNY_ROWS:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
