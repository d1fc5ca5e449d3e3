"""Running blocks over cached activations in batches: the generic helpers below the layer trainer,
shared by capture, sensitivity probes, healing and the compression loop."""

from __future__ import annotations

import torch
from torch import nn


def run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def batch_slices(start: int, stop: int, batch_size: int) -> list[slice]:
    return [slice(i, min(i + batch_size, stop)) for i in range(start, stop, batch_size)]
