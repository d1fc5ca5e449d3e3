"""Hook glue: capture what each block receives, run blocks over stored activations, and gather
input covariances for whitening. One generic mechanism for every architecture.

Blocks are called with the keyword arguments the model itself passes them (masks, rotary
embeddings, per-layer attention types), recorded once per batch size by stand-in blocks.
"""

from __future__ import annotations

import threading
from typing import Callable

import torch
from torch import nn

from .distill import run_block
from .distributed import SINGLE, Parallel
from .errors import ModelLoadError
from .lowrank import CovarianceAccumulator
from .models import Block, share_weights_copy


class _StopForward(Exception):
    pass


class Passthrough(nn.Module):
    """Takes a block's place and does no work: returns a fixed tensor if given, else its input."""

    def __init__(self, block: nn.Module, output: torch.Tensor | None = None):
        super().__init__()
        self.wrapped, self.output = block, output

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:  # models may read attributes of their blocks (attention_type, ...)
            return getattr(self.wrapped, name)

    def forward(self, *args, **kwargs):
        return self.output if self.output is not None else (args[0] if args else kwargs["hidden_states"])


class _StandIn(Passthrough):
    """Takes a block's place for one capture pass: records its inputs and passes them on."""

    def __init__(self, block: nn.Module, index: int, recorder: "BlockInputs", last: bool):
        super().__init__(block)
        self.index, self.recorder, self.last = index, recorder, last

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        self.recorder.record(self.index, hidden, {k: v for k, v in kwargs.items()})
        if self.last:
            raise _StopForward
        return hidden


def _parent_list(model: nn.Module, block: Block) -> tuple[nn.ModuleList, int]:
    parent_name, _, idx = block.name.rpartition(".")
    return model.get_submodule(parent_name), int(idx)


class BlockInputs:
    """First-block hidden states for every sequence, and each block's keyword arguments."""

    def __init__(self, num_blocks: int):
        self.kwargs: list[dict[int, dict]] = [dict() for _ in range(num_blocks)]
        self.hidden: list[torch.Tensor] = []
        self._expected_shape = None

    def record(self, index: int, hidden: torch.Tensor, kwargs: dict) -> None:
        if index == 0:
            self.hidden.append(hidden.detach())
            self._expected_shape = hidden.shape
        elif hidden.shape != self._expected_shape:
            raise ModelLoadError("this architecture passes block outputs in a form the engine does not understand")
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "use_cache")}
        self.kwargs[index].setdefault(hidden.shape[0], kwargs)

    def kwargs_for(self, index: int) -> Callable[[int], dict]:
        table = self.kwargs[index]
        return lambda batch_size: table[batch_size]


@torch.no_grad()
def capture_block_inputs(model: nn.Module, blocks: list[Block], sequences: torch.Tensor, batches: list[slice],
                         device: torch.device, storage: torch.device) -> tuple[torch.Tensor, BlockInputs]:
    """Run the model's own forward with stand-ins for every block, so no block does any work.

    The stand-ins go into a weight-sharing copy, so the model itself is never altered and other
    threads (the app's chat) can keep using it meanwhile.
    """
    recorder = BlockInputs(len(blocks))
    model = share_weights_copy(model)
    for block in blocks:
        parent, idx = _parent_list(model, block)
        parent[idx] = _StandIn(block.module, block.index, recorder, last=block is blocks[-1])
    for rows in batches:
        if rows.stop == rows.start:  # this process's share of a small batch can be empty
            continue
        try:
            model(input_ids=sequences[rows].to(device), use_cache=False)
        except _StopForward:
            pass
    hidden = torch.cat([h.to(storage) for h in recorder.hidden])
    recorder.hidden = []
    return hidden, recorder


@torch.no_grad()
def run_block_over(block: nn.Module, source: torch.Tensor, target: torch.Tensor, kwargs_for: Callable[[int], dict],
                   batches: list[slice], device: torch.device) -> torch.Tensor:
    """target[i] = block(source[i]) batch by batch; target may be source itself (in-place update).
    The batches must be those the block inputs were captured with (kwargs are per batch size)."""
    for rows in batches:
        if rows.stop == rows.start:
            continue
        out = run_block(block, source[rows].to(device), kwargs_for(rows.stop - rows.start))
        target[rows] = out.to(target.device, target.dtype)
    return target


class InputCovariances:
    """X^T X of the inputs of chosen linear modules of one block, while the block runs.

    Modules that read the very same tensor object (q/k/v, gate/up) share one accumulator, computed
    once. The tensors seen are held until the next batch so their ids cannot be reused meanwhile.
    Only calls from the creating thread count: the app may run the same teacher block for chat.
    """

    def __init__(self, block: nn.Module, module_names: list[str], device: torch.device):
        self.accumulators: dict[str, CovarianceAccumulator] = {}
        self._seen_this_batch: dict[int, tuple[torch.Tensor, CovarianceAccumulator]] = {}
        self._device = device
        self._thread = threading.get_ident()
        self._features = {name: block.get_submodule(name).in_features for name in module_names}
        self._handles = [block.register_forward_pre_hook(self._new_batch)]
        for name in module_names:
            self._handles.append(block.get_submodule(name).register_forward_hook(self._hook_for(name)))

    def _new_batch(self, *_):
        if threading.get_ident() == self._thread:
            self._seen_this_batch.clear()

    def _hook_for(self, name: str):
        def hook(module, args, output):
            if threading.get_ident() != self._thread:
                return
            x = args[0]
            seen = self._seen_this_batch.get(id(x))
            if seen is not None:
                self.accumulators[name] = seen[1]
                return
            acc = self.accumulators.setdefault(name, CovarianceAccumulator(x.shape[-1], self._device))
            acc.add(x)
            self._seen_this_batch[id(x)] = (x, acc)

        return hook

    def means(self, parallel: Parallel = SINGLE) -> dict[str, torch.Tensor]:
        """X^T X / tokens of every module, over all processes' data. A module that saw no token (an MoE
        expert no calibration token was routed to) gets zeros, which whitening turns into a plain SVD."""
        out = {}
        for name, features in self._features.items():  # the same order in every process
            acc = self.accumulators.get(name)
            total = acc.sum if acc else torch.zeros(features, features, dtype=torch.float64, device=self._device)
            tokens = acc.tokens if acc else 0
            if parallel.enabled:  # a copy, so an accumulator shared by several modules is summed only once
                total = parallel.all_reduce(total.clone())
                tokens, = parallel.sum_values(tokens, device=self._device)
            out[name] = total / max(tokens, 1)
        return out

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
