"""Where a layer's time goes: wall-clock seconds per phase, always on (one perf_counter pair per phase).

The phases (LayerFinished.breakdown keys) do not overlap, so their sum is at most the layer's seconds;
what is left over is bookkeeping between phases (events, installing the block).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

# The order the report shows them in; "train_steps" is the optimiser steps, everything else is overhead.
PHASES = ("teacher_targets", "covariance", "factorisation", "train_steps", "step_events", "held_out", "checkpoint",
          "advance")
TRAINING = "train_steps"


class PhaseTimer:
    """Seconds spent per phase; a phase entered twice adds up."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def move(self, source: str, target: str, seconds: float) -> None:
        """Book `seconds` measured inside `source` (a nested phase, e.g. covariance hooks in a forward) on `target`."""
        seconds = min(seconds, self.seconds.get(source, 0.0))
        self.add(source, -seconds)
        self.add(target, seconds)


def outside_training_share(breakdown: dict[str, float], seconds: float) -> float:
    """Share of a layer's wall-clock seconds not spent in optimiser steps (1 - train_steps / seconds)."""
    return 1.0 - breakdown.get(TRAINING, 0.0) / seconds if seconds > 0 else 0.0
