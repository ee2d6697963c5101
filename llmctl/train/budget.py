"""A run's wall-clock budget (`train.max_minutes`): elapsed time carried across resumes, agreed by all ranks,
as the share of the budget spent, which the learning-rate schedule follows."""

from __future__ import annotations

import time

import torch

from llmctl.train.distributed import DistributedContext, all_reduce_max


class WallClock:
    def __init__(
        self, max_minutes: float | None, context: DistributedContext, elapsed_before: float = 0.0
    ) -> None:
        self.budget = max_minutes * 60 if max_minutes else None
        self.context = context
        self.elapsed_before = elapsed_before
        self.started = time.perf_counter()

    def restart(self, elapsed_before: float = 0.0) -> None:
        """Count from now, after `elapsed_before` seconds of earlier sessions (a resumed run's)."""
        self.elapsed_before, self.started = elapsed_before, time.perf_counter()

    def elapsed(self) -> float:
        """Seconds spent on this run, earlier sessions included; the slowest rank's, so all ranks agree."""
        local = torch.tensor(self.elapsed_before + time.perf_counter() - self.started, dtype=torch.float64)
        return float(all_reduce_max(local.to(self.context.device), self.context))

    def fraction(self) -> float | None:
        """Share of the budget spent (may pass 1 within the last step); None without a budget."""
        return None if self.budget is None else self.elapsed() / self.budget


def budget_spent(time_fraction: float | None) -> bool:
    return time_fraction is not None and time_fraction >= 1
