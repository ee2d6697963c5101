"""Calibrated rounding (GPTQ, Frantar et al. 2022): quantize a weight one input column at a time and push
each column's rounding error onto the columns not yet quantized, weighted by the inverse of the input
covariance H = X^T X of a few calibration windows, so the layer's *output* error on real activations is
what gets minimised rather than the weights' own error (which is all round-to-nearest sees).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from llmctl.model import Transformer
from llmctl.quantization.qlinear import Int4Linear, Int8Linear
from llmctl.quantization.quantize import QuantizationSettings, quantized_linear_names

DAMPING = 0.01  # of the mean diagonal of H, added to it: keeps the inverse stable
BLOCK = 128  # columns whose updates are applied lazily together (same result, far fewer passes)


@torch.no_grad()
def input_covariances(
    model: Transformer, names: list[str], windows: list[torch.Tensor]
) -> dict[str, torch.Tensor]:
    """X^T X (in, in) of each named linear's input over the calibration windows. Linears called one after
    another on the same tensor (q/k/v, gate/up) share one matrix, computed once."""
    sums: dict[str, torch.Tensor] = {}
    alias: dict[str, str] = {}
    last: dict = {"input": None, "owner": None}  # holding the input keeps it alive, so `is` is reliable

    def record(name: str, x: torch.Tensor) -> None:
        if x is last["input"]:
            alias[name] = last["owner"]
            return
        last["input"], last["owner"] = x, name
        flat = x.reshape(-1, x.shape[-1]).float()
        product = flat.T @ flat
        sums[name] = sums[name] + product if name in sums else product

    hooks = [
        model.get_submodule(name).register_forward_pre_hook(
            lambda module, args, name=name: record(name, args[0])
        )
        for name in names
    ]
    try:
        for window in windows:
            model(window)
            last["input"] = None
    finally:
        for hook in hooks:
            hook.remove()
    return {name: sums[alias.get(name, name)] for name in names}


def _inverse_cholesky(covariance: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of H^-1 (damped); input channels never active are zeroed in `weight`."""
    h = covariance.clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    weight[:, dead] = 0.0
    h.diagonal().add_(DAMPING * h.diagonal().mean())
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inverse, upper=True)


def _group_range(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int4 scale and offset (out,) of a group's current columns."""
    low, high = weight.amin(dim=1), weight.amax(dim=1)
    return ((high - low) / 15).clamp(min=1e-10), low


def gptq_weight(
    weight: torch.Tensor, covariance: torch.Tensor, settings: QuantizationSettings
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(q, scale, offset): int8 q (out, in) with per-row scale and no offset, or int4 q with per-group scale
    and offset (out, groups), each group's range taken from its columns as updated when it is reached."""
    weight = weight.detach().float().clone()
    out_features, in_features = weight.shape
    hinv = _inverse_cholesky(covariance, weight)
    int4 = settings.method == "int4"
    group = settings.group_size if int4 else in_features
    q = torch.zeros_like(weight, dtype=torch.uint8 if int4 else torch.int8)
    scales = torch.zeros(out_features, in_features // group)
    offsets = torch.zeros_like(scales) if int4 else None
    if not int4:
        scales[:, 0] = (weight.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)

    for start in range(0, in_features, BLOCK):
        end = min(start + BLOCK, in_features)
        block = weight[:, start:end].clone()
        errors = torch.zeros_like(block)
        for column in range(end - start):
            index = start + column
            g = index // group
            if int4 and index % group == 0:
                # the group's range from its columns as they stand now, earlier errors pushed in (groups
                # of 32/64/128 never straddle a block of 128)
                scales[:, g], offsets[:, g] = _group_range(block[:, column : column + group])
            w = block[:, column]
            if int4:
                levels = ((w - offsets[:, g]) / scales[:, g]).round().clamp(0, 15)
                dequantized = levels * scales[:, g] + offsets[:, g]
            else:
                levels = (w / scales[:, 0]).round().clamp(-127, 127)
                dequantized = levels * scales[:, 0]
            q[:, index] = levels.to(q.dtype)
            error = (w - dequantized) / hinv[index, index]
            block[:, column:] -= error[:, None] * hinv[index, index:end][None, :]
            errors[:, column] = error
        weight[:, end:] -= errors @ hinv[start:end, end:]
    return q, scales, offsets


@torch.no_grad()
def gptq_layers(
    model: Transformer,
    settings: QuantizationSettings,
    windows: list[torch.Tensor],
    progress: Callable[[str], None] = lambda message: None,
) -> dict[str, nn.Module]:
    """Quantized replacements, by module name, for every linear the settings quantize."""
    names = quantized_linear_names(model, settings)
    progress(f"collecting input covariances on {len(windows)} calibration windows")
    covariances = input_covariances(model, names, windows)
    layers: dict[str, nn.Module] = {}
    for name in names:
        linear = model.get_submodule(name)
        q, scales, offsets = gptq_weight(linear.weight, covariances[name], settings)
        if settings.method == "int4":
            layer = Int4Linear(linear.in_features, linear.out_features, settings.group_size)
            layer.set_quantized(q, scales, offsets)
        else:
            layer = Int8Linear(linear.in_features, linear.out_features)
            layer.weight.copy_(q)
            layer.weight_scale.copy_(scales[:, 0])
        layers[name] = layer
    progress(f"quantized {len(layers)} linears against their calibration inputs")
    return layers
