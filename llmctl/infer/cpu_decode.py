"""The CPU decode fast path: an explicit swap made when a model is loaded for inference, kept only where it
measures faster on this machine.

At a handful of rows a projection is memory-bound. On some CPUs torch's sgemv streams weights at a third of
the bandwidth numpy's OpenBLAS reaches (2x decode speed on the AVX-512 box in benchmarks/RESULTS.md); on
others torch is as fast or faster, especially above one row. So `use_numpy_blas` swaps each plain
`nn.Linear` for a `NumpyBlasLinear` over the same parameters, times real decode steps both ways, and keeps
the swap only for the row counts where it won. While such a model decodes few rows, torch runs
single-threaded (`few_row_threads`): its spinning OpenMP threads would otherwise fight OpenBLAS's for the
cores. Training never sees any of this.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

CALIBRATION_ROWS = (1, 8)  # numpy is tried at more rows only once it has won at fewer
MIN_GAIN = 1.25  # numpy must be this much faster to be kept: a shared CPU's noise is ±10-20%


class NumpyBlasLinear(nn.Linear):
    """`nn.Linear` whose gradient-free fp32 CPU products of at most `max_rows` rows go through numpy's BLAS."""

    max_rows: int = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if (
            rows <= self.max_rows
            and self.bias is None
            and not torch.is_grad_enabled()
            and x.device.type == "cpu"
            and x.dtype == self.weight.dtype == torch.float32
        ):
            flat = x.reshape(rows, x.shape[-1]).numpy()
            product = flat @ self.weight.detach().numpy().T
            return torch.from_numpy(product).view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)


def numpy_blas_rows(model: nn.Module) -> int:
    """The row limit of the model's numpy path; 0 when it has none."""
    fast = next((m for m in model.modules() if isinstance(m, NumpyBlasLinear)), None)
    return fast.max_rows if fast is not None else 0


def use_numpy_blas(model: nn.Module, calibrate: bool = True) -> int:
    """Swap every plain CPU fp32 `nn.Linear` for a `NumpyBlasLinear` sharing its parameters, where that is
    faster here. Subclasses and wrappers (LoRA, quantized or pruned linears) keep their own forward.

    Returns the row limit kept (0: numpy never won, and the model is left as it was). `calibrate=False`
    keeps the swap for up to 64 rows without timing (for tests).
    """
    swapped: list[tuple[nn.Module, str, nn.Linear]] = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            plain_cpu_fp32 = type(child) is nn.Linear and child.weight.device.type == "cpu"
            if not plain_cpu_fp32 or child.weight.dtype != torch.float32:
                continue
            fast = NumpyBlasLinear(child.in_features, child.out_features, bias=False, device="meta")
            fast.weight, fast.bias = child.weight, child.bias  # shared, so a tied head stays tied
            setattr(parent, name, fast)
            swapped.append((parent, name, child))
    if not swapped:
        return 0
    limit = _fastest_row_limit(model) if calibrate else 64
    for parent, name, original in swapped:
        if limit:
            getattr(parent, name).max_rows = limit
        else:
            setattr(parent, name, original)
    return limit


def _fastest_row_limit(model: nn.Module) -> int:
    """The largest of CALIBRATION_ROWS up to which a decode step is MIN_GAIN faster through numpy; else 0."""
    fast_modules = [m for m in model.modules() if isinstance(m, NumpyBlasLinear)]

    def limit_rows(rows: int) -> None:
        for module in fast_modules:
            module.max_rows = rows

    limit = 0
    for rows in CALIBRATION_ROWS:
        with_numpy, with_torch = _decode_step_seconds(
            model, rows, partial(limit_rows, rows), partial(limit_rows, 0)
        )
        if with_torch < MIN_GAIN * with_numpy:
            break
        limit = rows
    return limit


@torch.inference_mode()
def _decode_step_seconds(
    model: nn.Module,
    rows: int,
    *setups: Callable[[], None],
    context: int = 32,
    rounds: int = 2,
    steps: int = 10,
) -> list[float]:
    """Fastest decode step of `rows` rows after a `context`-token prefill, for each setup. Setups take turns in
    blocks of `steps`, `rounds` times, so a noisy neighbour slows them alike; the first steps of a block
    are not counted (torch's thread pool takes a few steps to settle after its size changes)."""
    cache = model.new_kv_cache(batch_size=rows, max_len=context + rounds * len(setups) * steps)
    model(torch.zeros((rows, context), dtype=torch.long), kv_cache=cache)
    token = torch.zeros((rows, 1), dtype=torch.long)
    best = [float("inf")] * len(setups)
    for _ in range(rounds):
        for index, setup in enumerate(setups):
            setup()
            with few_row_threads(model, rows):
                for step in range(steps):
                    started = time.perf_counter()
                    model(token, kv_cache=cache)
                    if step >= 2:
                        best[index] = min(best[index], time.perf_counter() - started)
    return best


@contextmanager
def few_row_threads(model: nn.Module, rows: int) -> Iterator[None]:
    """Run torch single-threaded while a model with a numpy path decodes rows it takes that path for.

    Such a forward is a chain of tiny ops and memory-bound projections: torch's intra-op threads only add
    synchronisation and starve the BLAS threads that stream the weights. Switching costs under a microsecond.
    """
    if rows > numpy_blas_rows(model):
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
