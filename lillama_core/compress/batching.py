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


class _Unjoinable(Exception):
    pass


def _join(first, second, rows: int):
    if isinstance(first, torch.Tensor) and isinstance(second, torch.Tensor):
        if first.dim() and first.shape[0] == rows and second.shape == first.shape:
            return torch.cat([first, second])  # per sample: each half keeps its own
        if first is second or (first.shape == second.shape and torch.equal(first, second)):
            return first  # shared by every sample (rotary tables, broadcast masks)
        raise _Unjoinable
    if isinstance(first, (tuple, list)) and type(first) is type(second) and len(first) == len(second):
        return type(first)(_join(a, b, rows) for a, b in zip(first, second, strict=True))
    if isinstance(first, dict) and isinstance(second, dict) and first.keys() == second.keys():
        return {key: _join(first[key], second[key], rows) for key in first}
    if first is second or (type(first) is type(second) and isinstance(first, (int, float, str, bool))
                           and first == second):
        return first
    raise _Unjoinable


def join_batches(first: dict, second: dict, rows: int) -> dict | None:
    """The keyword arguments of one block call on two batches of `rows` samples stacked along the batch
    dimension ([2 * rows, ...]), from each batch's own; None where they cannot be stacked.

    A tensor whose first dimension is `rows` is per sample (a padding or sliding-window mask, a decoder's
    cross-attention states) and is concatenated, first batch first. Any other value must be the same for
    both batches (rotary tables, masks and position ids of shape [1, ...] broadcast over the batch) and is
    passed once. A value that differs without a batch dimension gives None: run the batches separately.
    """
    try:
        return _join(first, second, rows)
    except _Unjoinable:
        return None
