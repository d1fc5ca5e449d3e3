"""The learning-rate schedule shared by layer training and healing."""

from __future__ import annotations

import math


def lr_at(step: int, steps: int, lr: float, warmup_steps: int, schedule: str) -> float:
    """Linear warm-up, then constant or cosine decay to a tenth of the peak."""
    if step < warmup_steps:
        return lr * (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return lr
    progress = (step - warmup_steps) / max(steps - warmup_steps, 1)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))
