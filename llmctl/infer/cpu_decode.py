"""The CPU decode fast path: an explicit swap made when a model is loaded for inference.

At a handful of rows a projection is memory-bound: its time is the weight's bytes over the read bandwidth.
torch's fp32 sgemv streams weights at 35-60% of this machine's bandwidth and its few-row sgemm at a fifth
(benchmarks/decode.py), so `use_decode_kernels` swaps each plain `nn.Linear` for a `DecodeLinear` over the
same parameters, whose gradient-free products of up to `MAX_ROWS` rows run in llmctl's own kernel
(llmctl/kernels/few_rows.cpp). Prefill, training and other devices see torch's product unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmctl.kernels import decode_ops, kernel_rows


class DecodeLinear(nn.Linear):
    """`nn.Linear` whose gradient-free fp32 CPU products of at most `MAX_ROWS` rows run in llmctl's kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.rows_for_kernel(x)
        if rows:
            flat = x.reshape(rows, self.in_features).contiguous()
            product = torch.ops.llmctl_decode.fp32_linear(flat, self.weight)
            product = product if self.bias is None else product + self.bias
            return product.view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)

    def rows_for_kernel(self, x: torch.Tensor) -> int:
        """How many rows of x the kernel takes with this weight; 0 where torch's product runs instead."""
        rows = kernel_rows(x, self.in_features)
        usable = (
            not (torch.is_grad_enabled() and self.weight.requires_grad)
            and self.weight.dtype == torch.float32
            and self.weight.is_contiguous()
        )
        return rows if usable else 0

    @staticmethod
    def forward_together(x: torch.Tensor, linears: tuple[DecodeLinear, ...]) -> list[torch.Tensor]:
        """Projections of one input in one kernel call (`llmctl.model.layers.project_together`): at decode each
        call's fork and join of the thread pool costs as much as a small projection's reads."""
        rows = min(linear.rows_for_kernel(x) for linear in linears)
        if not rows:
            return [linear(x) for linear in linears]
        flat = x.reshape(rows, x.shape[-1]).contiguous()
        weights = [linear.weight for linear in linears]
        products = torch.ops.llmctl_decode.fp32_linear_group(flat, weights)  # (rows, sum of outs)
        widths = [linear.out_features for linear in linears]
        return [
            (product if linear.bias is None else product + linear.bias).view(*x.shape[:-1], width)
            for product, width, linear in zip(products.split(widths, dim=-1), widths, linears, strict=True)
        ]


def use_decode_kernels(model: nn.Module) -> int:
    """Swap every plain CPU fp32 `nn.Linear` for a `DecodeLinear` sharing its parameters (so a tied head stays
    tied). Subclasses and wrappers (LoRA, quantized or pruned linears) keep their own forward.

    Returns how many were swapped: 0 where the kernels cannot be built here (said once, by `decode_ops`).
    """
    if decode_ops() is None:
        return 0
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear or child.weight.device.type != "cpu":
                continue
            if child.weight.dtype != torch.float32:
                continue
            fast = DecodeLinear(child.in_features, child.out_features, bias=False, device="meta")
            fast.weight, fast.bias = child.weight, child.bias
            setattr(parent, name, fast)
            swapped += 1
    return swapped
