"""Learning-rate schedule (pure arithmetic: the optimizer step in, the learning rate out)."""

from __future__ import annotations

import math

SCHEDULES = ("constant", "linear", "cosine")


def lr_at(step: int, *, lr: float, min_lr: float = 0.0, warmup_steps: int = 0, schedule: str = "constant",
          total_steps: int = 0) -> float:
    """Linear warmup over ``warmup_steps``, then constant / linear / cosine decay from ``lr`` to
    ``min_lr`` over the remaining ``total_steps - warmup_steps`` optimizer steps."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant" or total_steps <= warmup_steps:
        return lr
    frac = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        return min_lr + (lr - min_lr) * (1 - frac)
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * frac))
