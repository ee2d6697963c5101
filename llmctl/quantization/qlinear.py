"""Weight-only quantized layers: int8 per output channel, int4 group-wise, and an int8 embedding.

Decode-sized CPU products (a few rows) run in llmctl's own kernels (llmctl/kernels): on this project's
machines torch's `_weight_int8pack_mm` / `_weight_int4pack_mm_for_cpu`, torchao's and optimum-quanto's eager
weight-only layers were all slower than the fp32 product (benchmarks/quant_kernels.py, docs/compression.md).
Larger products, gradients and other devices dequantize the weight and use the float matmul: correct
everywhere, fast where it counts.

The layers subclass `nn.Linear` / `nn.Embedding` so that code asking "is this a linear?" (PEFT's LoRA, the
CPU decode swap, the model's fused loss) sees one and then finds it is not a plain one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmctl.kernels import kernel_rows


def int4_quantize(
    weight: torch.Tensor, group_size: int, clip: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest int4 per group of `group_size` input columns, each group's range [min, max] (shrunk
    towards zero by `clip`, (out, groups) fractions, where given) mapped onto 0..15.

    Returns q (out, in) uint8, scale and offset (out, groups), with W ~ q * scale + offset."""
    weight = weight.detach().float()
    out_features, in_features = weight.shape
    groups = weight.reshape(out_features, -1, group_size)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    if clip is not None:
        low, high = low * clip, high * clip
    scale = ((high - low) / 15).clamp(min=1e-10)
    q = ((groups - low[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.uint8)
    return q.reshape(out_features, in_features), scale, low


def int4_fake_quantize(
    weight: torch.Tensor, group_size: int, clip: torch.Tensor | None = None
) -> torch.Tensor:
    """The weight after an int4 round trip, for searching scales and clipping."""
    q, scale, low = int4_quantize(weight, group_size, clip)
    groups = q.float().reshape(*scale.shape, group_size)
    return (groups * scale[..., None] + low[..., None]).reshape(weight.shape)


def int8_fake_quantize(weight: torch.Tensor) -> torch.Tensor:
    scale = (weight.abs().amax(dim=1, keepdim=True) / 127).clamp(min=torch.finfo(torch.float32).tiny)
    return (weight / scale).round().clamp(-127, 127) * scale


def _no_parameters(module: nn.Module) -> None:
    """Drop the float parameters nn.Linear/nn.Embedding created; the quantized buffers replace them."""
    del module.weight
    module.register_parameter("bias", None)


def keep_bias(layer: nn.Module, linear: nn.Linear) -> nn.Module:
    """A quantized layer carries its float linear's bias (Qwen2's q/k/v) unquantized: a float parameter of
    the same name, so files and PEFT see it where an nn.Linear keeps it. Only its shape is used on meta."""
    if linear.bias is not None:
        bias = torch.zeros_like(linear.bias, device=layer.weight_scale.device)
        if linear.bias.device.type != "meta":
            bias.copy_(linear.bias.detach())
        layer.bias = nn.Parameter(bias, requires_grad=False)
    return layer


def _with_bias(out: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return out if bias is None else out + bias.to(out.dtype)


class Int8Linear(nn.Linear):
    """y = x W^T with W = weight (int8, out x in) * weight_scale (one per output channel)."""

    def __init__(self, in_features: int, out_features: int, device: torch.device | str | None = None) -> None:
        super().__init__(in_features, out_features, bias=False, device="meta")
        _no_parameters(self)
        self.register_buffer(
            "weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
        )
        self.register_buffer("weight_scale", torch.ones(out_features, device=device))

    @classmethod
    def from_weight(cls, weight: torch.Tensor) -> Int8Linear:
        """Symmetric round-to-nearest, the scale set by each row's largest magnitude."""
        weight = weight.detach().float()
        layer = cls(weight.shape[1], weight.shape[0], device=weight.device)
        scale = (weight.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
        layer.weight.copy_((weight / scale[:, None]).round().clamp(-127, 127).to(torch.int8))
        layer.weight_scale.copy_(scale)
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        return cls.from_weight(linear.weight)

    def dequantize(self) -> torch.Tensor:
        return self.weight.float() * self.weight_scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = kernel_rows(x, self.in_features)
        if rows:
            flat = x.reshape(rows, self.in_features).contiguous()
            out = torch.ops.llmctl_decode.int8_linear(flat, self.weight, self.weight_scale)
            return _with_bias(out.view(*x.shape[:-1], self.out_features), self.bias)
        return _with_bias(F.linear(x, self.weight.to(x.dtype)) * self.weight_scale.to(x.dtype), self.bias)


class Int4Linear(nn.Linear):
    """Group-wise asymmetric int4: W[:, g] = q[:, g] * weight_scale[:, g] + weight_offset[:, g] for each group
    of `group_size` input columns. `weight_packed` holds two 4-bit values per byte, column 2j in the low
    nibble: the layout on disk and the one the CPU kernel reads."""

    def __init__(
        self, in_features: int, out_features: int, group_size: int, device: torch.device | str | None = None
    ) -> None:
        if in_features % group_size or group_size % 16:
            raise ValueError(f"int4 group size {group_size} does not divide the {in_features} input features")
        nn.Module.__init__(self)  # not nn.Linear's: it would create the float weight this class replaces
        self.in_features, self.out_features = in_features, out_features
        self.register_parameter("bias", None)
        self.group_size = group_size
        groups = in_features // group_size
        self.register_buffer(
            "weight_packed", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device)
        )
        self.register_buffer("weight_scale", torch.ones(out_features, groups, device=device))
        self.register_buffer("weight_offset", torch.zeros(out_features, groups, device=device))

    @classmethod
    def from_weight(
        cls, weight: torch.Tensor, group_size: int, clip: torch.Tensor | None = None
    ) -> Int4Linear:
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, group_size, device=weight.device)
        layer.set_quantized(*int4_quantize(weight, group_size, clip))
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int) -> Int4Linear:
        return cls.from_weight(linear.weight, group_size)

    def set_quantized(self, q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> None:
        """q: (out, in) integers 0..15; scale, offset: (out, in / group_size)."""
        self.weight_packed.copy_(q[:, 0::2] | (q[:, 1::2] << 4))
        self.weight_scale.copy_(scale)
        self.weight_offset.copy_(offset)

    @property
    def weight(self) -> torch.Tensor:
        """The packed values: what tools asking a linear for its weight's device or shape (PEFT) get."""
        return self.weight_packed

    def unpacked(self) -> torch.Tensor:
        """The 4-bit values, (out, in), as uint8."""
        low, high = self.weight_packed & 0x0F, self.weight_packed >> 4
        return torch.stack((low, high), dim=-1).reshape(self.out_features, self.in_features)

    def dequantize(self) -> torch.Tensor:
        q = self.unpacked().float().reshape(self.out_features, -1, self.group_size)
        weight = q * self.weight_scale[..., None] + self.weight_offset[..., None]
        return weight.reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = kernel_rows(x, self.in_features)
        if rows:
            flat = x.reshape(rows, self.in_features).contiguous()
            out = torch.ops.llmctl_decode.int4_linear(
                flat, self.weight_packed, self.weight_scale, self.weight_offset, self.group_size
            )
            return _with_bias(out.view(*x.shape[:-1], self.out_features), self.bias)
        return F.linear(
            x, self.dequantize().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype)
        )


class Int8Embedding(nn.Embedding):
    """A lookup table held int8 with one scale per row: the rows are dequantized after the lookup."""

    def __init__(self, num_embeddings: int, dim: int, device: torch.device | str | None = None) -> None:
        super().__init__(num_embeddings, dim, device="meta")
        del self.weight
        self.register_buffer("weight", torch.zeros(num_embeddings, dim, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(num_embeddings, device=device))

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding) -> Int8Embedding:
        quantized = Int8Linear.from_weight(embedding.weight)
        layer = cls(embedding.num_embeddings, embedding.embedding_dim, device=embedding.weight.device)
        layer.weight.copy_(quantized.weight)
        layer.weight_scale.copy_(quantized.weight_scale)
        return layer

    def dequantize(self) -> torch.Tensor:
        return self.weight.float() * self.weight_scale[:, None]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight).float() * self.weight_scale[ids][..., None]
