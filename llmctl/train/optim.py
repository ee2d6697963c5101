"""AdamW with decay/no-decay parameter groups, and the learning-rate schedules as pure functions of the step."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from llmctl.recipe import OptimSection, ScheduleSection


def parameter_groups(
    model: nn.Module, optim: OptimSection, lr_scale: Callable[[str], float] = lambda name: 1.0
) -> list[dict]:
    """Trainable parameters grouped by weight decay (matrices only: norms and biases never, embeddings only
    when the recipe asks) and by `lr_scale`, each group's share of the scheduled learning rate."""
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():  # a tied LM head is listed once, as the embedding
        if not param.requires_grad:
            continue
        is_embedding = "embed_tokens" in name
        no_decay = param.ndim < 2 or name.endswith(".bias") or (is_embedding and not optim.decay_embeddings)
        groups.setdefault((0.0 if no_decay else optim.weight_decay, lr_scale(name)), []).append(param)
    return [
        {"params": params, "weight_decay": decay, "lr_scale": scale}
        for (decay, scale), params in sorted(groups.items(), key=lambda item: (-item[0][0], -item[0][1]))
    ]


def build_optimizer(
    model: nn.Module,
    optim: OptimSection,
    device: torch.device,
    lr_scale: Callable[[str], float] = lambda name: 1.0,
) -> torch.optim.AdamW:
    """Fused AdamW (one kernel for all parameters) where the device and parameters allow it."""
    groups = parameter_groups(model, optim, lr_scale)
    params = [p for group in groups for p in group["params"]]
    is_dtensor = any(type(p).__name__ == "DTensor" for p in params)
    fused = device.type in ("cuda", "cpu") and not is_dtensor
    return torch.optim.AdamW(
        groups, lr=optim.lr, betas=optim.betas, eps=optim.eps, fused=fused, foreach=None if fused else True
    )


def lr_at(
    step: int, total_steps: int, peak_lr: float, schedule: ScheduleSection, time_fraction: float | None = None
) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup over steps, then the recipe's decay
    over the run's progress: the share of steps done, or, for a wall-clock budget, `time_fraction` spent."""
    warmup = schedule.warmup_steps
    if warmup and step < warmup:
        return peak_lr * (step + 1) / warmup
    if schedule.kind == "constant":
        return peak_lr
    floor = peak_lr * schedule.min_lr_ratio
    if schedule.kind == "wsd":  # warmup-stable-decay: flat until the last decay_fraction, then linear
        if time_fraction is not None:
            progress = (time_fraction - (1 - schedule.decay_fraction)) / schedule.decay_fraction
        else:
            decay_start = max(int(total_steps * (1 - schedule.decay_fraction)), warmup)
            progress = (step - decay_start) / max(1, total_steps - decay_start)
        return peak_lr - (peak_lr - floor) * min(max(progress, 0.0), 1.0)
    if time_fraction is not None:
        progress = min(time_fraction, 1.0)
    else:
        progress = min((step - warmup) / max(1, total_steps - warmup), 1.0)
    if schedule.kind == "linear":
        return peak_lr - (peak_lr - floor) * progress
    return floor + (peak_lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))
