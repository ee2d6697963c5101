"""Pruning the block projections: unstructured magnitude pruning to a sparsity, or the 2:4 pattern (two
zeros in every four consecutive input weights) that sparse tensor cores run. The result is a plain
checkpoint whose zeros are stored as zeros: it opens everywhere, is no smaller on disk and no faster on a
CPU; it is what a sparse runtime or a later compression step starts from."""

from __future__ import annotations

from typing import Literal

import torch

from llmctl.model import Transformer
from llmctl.quantization.quantize import block_linear_names

PruneMethod = Literal["magnitude", "2:4"]


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """True where a weight is kept: all but the `sparsity` fraction of smallest magnitudes in the matrix."""
    drop = int(round(sparsity * weight.numel()))
    if drop == 0:
        return torch.ones_like(weight, dtype=torch.bool)
    threshold_index = weight.abs().flatten().argsort()[:drop]
    mask = torch.ones(weight.numel(), dtype=torch.bool, device=weight.device)
    mask[threshold_index] = False
    return mask.view_as(weight)


def two_four_mask(weight: torch.Tensor) -> torch.Tensor:
    """True where a weight is kept: the two largest magnitudes of every four consecutive input columns."""
    out_features, in_features = weight.shape
    if in_features % 4:
        raise ValueError(f"2:4 pruning needs input features divisible by 4, not {in_features}")
    groups = weight.abs().reshape(out_features, in_features // 4, 4)
    keep = groups.topk(2, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.reshape(out_features, in_features)


@torch.no_grad()
def prune_model(model: Transformer, method: PruneMethod, sparsity: float = 0.5) -> dict[str, float]:
    """Zero weights of every block projection in place; the measured sparsity of each, by module name."""
    if method == "magnitude" and not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1), not {sparsity}")
    measured = {}
    for name in block_linear_names(model):
        weight = model.get_submodule(name).weight
        mask = two_four_mask(weight) if method == "2:4" else magnitude_mask(weight, sparsity)
        weight.mul_(mask)
        measured[name] = float((weight == 0).float().mean())
    return measured
