"""Kernels one decoder block launches per token: the aten operators it runs for a one-token forward (the work of
one decoding step), views left out (they launch nothing), matrix multiplies counted apart. On a GPU in eager mode
each is one launch, whose fixed cost bounds the decoding of small models."""

from __future__ import annotations

import statistics
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lillama_core.modeling.discovery import find_blocks

MATMULS = ("mm", "addmm", "bmm", "baddbmm")


class _Operators(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts, self.active = Counter(), False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.active and not func.is_view:
            self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


@torch.no_grad()
def kernels_per_block(model: torch.nn.Module, block: int = 0) -> dict:
    """{"matmuls": ..., "operators": ...} that `model`'s block `block` runs for one token (causal LMs)."""
    module = find_blocks(model)[block].module
    operators = _Operators()
    hooks = [module.register_forward_pre_hook(lambda *_: setattr(operators, "active", True)),
             module.register_forward_hook(lambda *_: setattr(operators, "active", False))]
    ids = torch.zeros(1, 1, dtype=torch.long, device=next(model.parameters()).device)
    try:
        with operators:
            model(input_ids=ids, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return {"matmuls": sum(operators.counts[name] for name in MATMULS), "operators": sum(operators.counts.values())}


def mean_kernels_per_block(model: torch.nn.Module) -> dict:
    """kernels_per_block averaged over every block: a plan may leave some blocks (often the first) dense."""
    counts = [kernels_per_block(model, i) for i in range(len(find_blocks(model)))]
    return {key: statistics.mean(c[key] for c in counts) for key in counts[0]}
