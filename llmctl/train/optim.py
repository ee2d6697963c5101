"""The optimizer (AdamW, or Muon for the hidden matrices with AdamW for the rest) with decay/no-decay parameter
groups, and the learning-rate schedules as pure functions of the step."""

from __future__ import annotations

import math
from collections import ChainMap
from collections.abc import Callable, Iterator

import torch
from torch import nn

from llmctl.recipe import OptimSection, ScheduleSection


def parameter_groups(
    model: nn.Module, optim: OptimSection, lr_scale: Callable[[str], float] = lambda name: 1.0
) -> list[dict]:
    """Trainable parameters grouped by weight decay (matrices only: norms and biases never, embeddings only
    when the recipe asks) and by their share of the scheduled learning rate: `lr_scale`, times
    `optim.embedding_lr_scale` for the token embedding and `optim.head_lr_scale` for an untied LM head."""
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, param in trainable(model):  # a tied LM head is listed once, as the embedding
        is_embedding = "embed_tokens" in name
        no_decay = param.ndim < 2 or name.endswith(".bias") or (is_embedding and not optim.decay_embeddings)
        scale = lr_scale(name)
        if is_embedding:
            scale *= optim.embedding_lr_scale
        elif "lm_head" in name:
            scale *= optim.head_lr_scale
        groups.setdefault((0.0 if no_decay else optim.weight_decay, scale), []).append(param)
    return [
        {"params": params, "weight_decay": decay, "lr_scale": scale}
        for (decay, scale), params in sorted(groups.items(), key=lambda item: (-item[0][0], -item[0][1]))
    ]


class Optimizers:
    """One or more torch optimizers stepped as one. The trainer, the gradient scaler and the checkpoint see a
    single object; `parts` go to torch's distributed state-dict API, which keys every state by parameter name."""

    def __init__(self, *parts: torch.optim.Optimizer) -> None:
        self.parts = parts

    @property
    def param_groups(self) -> list[dict]:
        return [group for part in self.parts for group in part.param_groups]

    @property
    def state(self) -> ChainMap:
        return ChainMap(*(part.state for part in self.parts))

    def step(self) -> None:
        for part in self.parts:
            part.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts:
            part.zero_grad(set_to_none=set_to_none)


def is_hidden_matrix(name: str, param: nn.Parameter) -> bool:
    """The transformer blocks' 2-D weights (and adapters'): what Muon steps and `finetune.keep_sparsity` keeps
    pruned. Never the embedding or the LM head, whose rows are per-token lookups rather than linear maps."""
    return param.ndim == 2 and "embed_tokens" not in name and "lm_head" not in name


def build_optimizer(
    model: nn.Module,
    optim: OptimSection,
    device: torch.device,
    lr_scale: Callable[[str], float] = lambda name: 1.0,
) -> Optimizers:
    """Fused AdamW (one kernel for all parameters) where the device and parameters allow it; with
    `optim.name = "muon"`, torch's Muon for the hidden matrices, its step scaled to AdamW's RMS
    ("match_rms_adamw") so that the recipe's lr and weight decay mean the same for both."""
    params = [p for _, p in trainable(model)]
    is_dtensor = any(type(p).__name__ == "DTensor" for p in params)
    fused = device.type in ("cuda", "cpu") and not is_dtensor

    def adamw(groups: list[dict]) -> torch.optim.AdamW:
        return torch.optim.AdamW(
            groups,
            lr=optim.lr,
            betas=optim.betas,
            eps=optim.eps,
            fused=fused,
            foreach=None if fused else True,
        )

    if optim.name == "adamw":
        return Optimizers(adamw(parameter_groups(model, optim, lr_scale)))
    hidden = {id(p) for name, p in trainable(model) if is_hidden_matrix(name, p)}
    muon_groups: list[dict] = []
    adamw_groups: list[dict] = []
    for group in parameter_groups(model, optim, lr_scale):  # each group split between the two optimizers
        for is_hidden, target in ((True, muon_groups), (False, adamw_groups)):
            share = [p for p in group["params"] if (id(p) in hidden) == is_hidden]
            if share:
                target.append({**group, "params": share})
    muon = torch.optim.Muon(
        muon_groups, lr=optim.lr, momentum=optim.muon_momentum, adjust_lr_fn="match_rms_adamw"
    )
    return Optimizers(muon, adamw(adamw_groups)) if adamw_groups else Optimizers(muon)


def trainable(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    return ((name, p) for name, p in model.named_parameters() if p.requires_grad)


def warmup_steps(schedule: ScheduleSection, total_steps: int) -> int:
    """The warmup's length in steps: the recipe's, or else its share of the run."""
    if schedule.warmup_steps is not None:
        return schedule.warmup_steps
    return round(schedule.warmup_fraction * total_steps)


def lr_at(
    step: int, total_steps: int, peak_lr: float, schedule: ScheduleSection, time_fraction: float | None = None
) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then the recipe's decay over the
    run's progress: the share of steps done, or, for a wall-clock budget, `time_fraction` spent.

    The warmup is `schedule.warmup_steps`, or else `schedule.warmup_fraction` of the steps (of the time, on a
    budget): a fixed 100 steps was 41% of a 244-step run and cost it 0.7-1% in bits per byte."""
    if time_fraction is not None and schedule.warmup_steps is None:  # a budget's warmup is on the clock too
        if time_fraction < schedule.warmup_fraction:
            return peak_lr * time_fraction / schedule.warmup_fraction
        warmup = 0
    else:
        warmup = warmup_steps(schedule, total_steps)
    if step < warmup:
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
