"""Which weight-only quantized linear to build on, measured: llmctl's kernels (llmctl/compress/kernels),
torch's own CPU kernels (`_weight_int8pack_mm`; `_weight_int4pack_mm_for_cpu` through torchao's
Int4OpaqueTensor), torchao's int8/int4 weight-only configs and optimum-quanto's qint8/qint4, against the fp32
linear, on the projections of the 134M shape (d768 x 12, vocab 32k) at decode row counts. Prints
microseconds per call, the ratio to fp32 and the relative error of the output against fp32.

    .venv/bin/python -m benchmarks.quant_kernels [--rows 1 8] [--group-size 64]

torchao and optimum-quanto are not llmctl dependencies; put them on the path to include them
(`pip install --target DIR torchao optimum-quanto` and `PYTHONPATH=DIR`); a library that is missing or
fails on this machine is reported, not skipped silently.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable

import torch
from torch import nn

from benchmarks.common import machine
from llmctl.quantization.qlinear import Int4Linear, Int8Linear

SHAPES = {"q/k/v/o": (768, 768), "gate/up": (2048, 768), "down": (768, 2048), "head": (32000, 768)}


def seconds_per_call(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, calls: int) -> float:
    with torch.no_grad():  # not inference_mode: optimum-quanto's qint4 fails under it
        for _ in range(3):
            forward(x)
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            for _ in range(calls):
                forward(x)
            best = min(best, (time.perf_counter() - started) / calls)
    return best


class TorchInt8PackLinear(nn.Module):
    """torch's own int8 weight-only CPU kernel on llmctl's per-channel weights."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.quantized = Int8Linear.from_linear(linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, self.quantized.weight, self.quantized.weight_scale)


def torchao_linear(linear: nn.Linear, bits: int, group_size: int) -> nn.Module:
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    module = nn.Sequential(copy.deepcopy(linear))
    if bits == 8:
        config = Int8WeightOnlyConfig()
    else:
        from torchao.quantization.quantize_.workflows import Int4PackingFormat

        config = Int4WeightOnlyConfig(
            group_size=group_size, int4_packing_format=Int4PackingFormat.PLAIN_INT32
        )
    quantize_(module, config)
    return module


def torchao_opaque_int4(linear: nn.Linear, group_size: int) -> nn.Module:
    """torchao's CPU int4 layout (a prototype in 0.18): the same tinygemm CPU kernel llmctl calls."""
    from torchao.prototype.quantization.int4.int4_opaque_tensor import Int4OpaqueTensor

    module = copy.deepcopy(linear)
    module.weight = nn.Parameter(
        Int4OpaqueTensor.from_hp(module.weight.detach(), [1, group_size]), requires_grad=False
    )
    return module


def quanto_linear(linear: nn.Linear, bits: int) -> nn.Module:
    from optimum.quanto import freeze, qint4, qint8, quantize

    module = nn.Sequential(copy.deepcopy(linear))
    quantize(module, weights=qint8 if bits == 8 else qint4)
    freeze(module)
    return module


def candidates(linear: nn.Linear, group_size: int) -> dict[str, Callable[[], nn.Module]]:
    return {
        "fp32 nn.Linear": lambda: linear,
        "int8 llmctl kernel": lambda: Int8Linear.from_linear(linear),
        "int8 torch _weight_int8pack_mm": lambda: TorchInt8PackLinear(linear),
        "int8 torchao Int8WeightOnlyConfig": lambda: torchao_linear(linear, 8, group_size),
        "int8 optimum-quanto qint8": lambda: quanto_linear(linear, 8),
        "int4 llmctl kernel": lambda: Int4Linear.from_linear(linear, group_size),
        "int4 torchao Int4WeightOnlyConfig plain_int32": lambda: torchao_linear(linear, 4, group_size),
        "int4 torchao Int4OpaqueTensor (torch tinygemm CPU)": lambda: torchao_opaque_int4(linear, group_size),
        "int4 optimum-quanto qint4 (group 128)": lambda: quanto_linear(linear, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"machine: {machine()}; torch threads {torch.get_num_threads()}; group size {args.group_size}")
    for label, (out_features, in_features) in SHAPES.items():
        linear = nn.Linear(in_features, out_features, bias=False)
        nn.init.normal_(linear.weight, std=0.02)
        for rows in args.rows:
            x = torch.randn(rows, in_features)
            with torch.no_grad():
                reference = linear(x)
            base = seconds_per_call(linear, x, args.calls)
            print(f"\n{label} {out_features}x{in_features}, {rows} row(s)")
            print(f"  {'kernel':50}{'us/call':>10}{'vs fp32':>9}{'rel err':>10}")
            for name, build in candidates(linear, args.group_size).items():
                try:
                    module = build()
                    with torch.no_grad():
                        error = (module(x) - reference).norm() / reference.norm()
                    seconds = seconds_per_call(module, x, args.calls)
                except Exception as failure:  # a library that fails here is a finding, reported as such
                    print(f"  {name:50}  failed: {type(failure).__name__}: {str(failure)[:80]}")
                    continue
                print(f"  {name:50}{seconds * 1e6:>10.1f}{base / seconds:>8.2f}x{error:>10.4f}")


if __name__ == "__main__":
    main()
