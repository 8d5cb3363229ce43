"""Hyper-parameter schedules (as fastai's callback/schedule.py): functions of the training progress pct in [0, 1]."""

from __future__ import annotations

import math
from typing import Callable, Sequence


def sched_cos(start: float, end: float, pct: float) -> float:
    """Cosine from start (pct=0) to end (pct=1)."""
    return start + (1 + math.cos(math.pi * (1 - pct))) * (end - start) / 2


def sched_lin(start: float, end: float, pct: float) -> float:
    return start + pct * (end - start)


def sched_exp(start: float, end: float, pct: float) -> float:
    return start * (end / start) ** pct


def combine_scheds(pcts: Sequence[float], scheds: Sequence[Callable[[float], float]]) -> Callable[[float], float]:
    """One schedule made of phases: phase i covers a fraction pcts[i] of training and runs scheds[i] over it."""
    if abs(sum(pcts) - 1.0) > 1e-9 or any(p < 0 for p in pcts):
        raise ValueError(f"phase fractions must be >= 0 and sum to 1, got {list(pcts)}")
    bounds = [0.0]
    for p in pcts:
        bounds.append(bounds[-1] + p)

    def sched(pct: float) -> float:
        pct = min(max(pct, 0.0), 1.0)
        for i in range(len(scheds)):
            if pct <= bounds[i + 1] or i == len(scheds) - 1:
                width = bounds[i + 1] - bounds[i]
                return scheds[i]((pct - bounds[i]) / width if width > 0 else 1.0)
        raise AssertionError("unreachable")

    return sched


def combined_cos(pct: float, start: float, middle: float, end: float) -> Callable[[float], float]:
    """Cosine start -> middle over the first `pct` of training, then middle -> end."""
    return combine_scheds([pct, 1 - pct], [lambda p: sched_cos(start, middle, p), lambda p: sched_cos(middle, end, p)])


def one_cycle(lr_max: float, div: float = 25.0, div_final: float = 1e5, pct_start: float = 0.25,
              moms: tuple[float, float, float] = (0.95, 0.85, 0.95)):
    """fastai's 1cycle: lr lr_max/div -> lr_max -> lr_max/div_final, momentum moms[0] -> moms[1] -> moms[2]."""
    return (combined_cos(pct_start, lr_max / div, lr_max, lr_max / div_final),
            combined_cos(pct_start, *moms))
