"""Models bigger than the accelerator: blocks live in host memory and visit the accelerator one at a time.

`stream_blocks` leaves every block in host memory and puts everything else (embeddings, final norm, head,
rotary tables) on the accelerator. A forward pre-hook brings a block over just before it runs and a forward
hook sends it back after, so any code that runs the model (capture, planning probes, evaluation, chat) works
unchanged with inputs on the accelerator, and holds one block there at a time. Work that runs one block many
times (the distillation of a layer) pins it with `resident` for the duration instead of moving it per batch.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager

import torch
from torch import nn

HOME = torch.device("cpu")
_DEVICE, _PINNED, _VISITING = "_lillama_stream_device", "_lillama_pinned", "_lillama_visiting"
# Each streamed parameter's host tensor. Going home restores it instead of copying the accelerator's
# tensor back: no host copy is made, so weights loaded from a safetensors checkpoint stay memory-mapped
# (file pages, read when a block first runs, reclaimable) rather than becoming process memory. Streamed
# blocks are read-only: they are never trained in place (a student block is streamed once it is done).
# Kept outside the modules so weight-sharing copies of a block share it instead of copying it; keyed by id
# (tensors compare element-wise, so they cannot be dictionary keys), each entry dropped with its parameter.
_HOME_DATA: dict[int, tuple[weakref.ref, torch.Tensor]] = {}


def _remember_home(p: nn.Parameter) -> None:
    if id(p) not in _HOME_DATA:
        weakref.finalize(p, _HOME_DATA.pop, id(p), None)
    _HOME_DATA[id(p)] = (weakref.ref(p), p.data)


def _home_of(p: nn.Parameter) -> torch.Tensor | None:
    ref, data = _HOME_DATA.get(id(p), (None, None))
    return data if ref is not None and ref() is p and data.shape == p.shape else None


def is_streamed(block: nn.Module) -> bool:
    return block.__dict__.get(_DEVICE) is not None


def on_accelerator(block: nn.Module) -> bool:
    """Whether a streamed block is on the accelerator right now (pinned, or in the middle of its forward)."""
    return bool(block.__dict__.get(_PINNED) or block.__dict__.get(_VISITING))


def _arrive(block, args, kwargs):
    if not block.__dict__.get(_PINNED):
        block.to(block.__dict__[_DEVICE])
        block.__dict__[_VISITING] = True


def _leave(block, args, kwargs, output):
    if block.__dict__.get(_VISITING):
        _send_home(block)
        block.__dict__[_VISITING] = False


def _send_home(block: nn.Module) -> None:
    for p in block.parameters():
        home = _home_of(p)
        p.data = home if home is not None else p.data.to(HOME)
    for module in block.modules():  # buffers are small (norm statistics, rotary tables): copied
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = buffer.to(HOME)


def stream_block(block: nn.Module, device: torch.device) -> nn.Module:
    """Keep `block` in host memory, running it on `device`; a block copied from a streamed one is already
    streamed and is only sent home."""
    if not is_streamed(block):
        block.register_forward_pre_hook(_arrive, with_kwargs=True)
        block.register_forward_hook(_leave, with_kwargs=True)
    block.__dict__.update({_DEVICE: torch.device(device), _PINNED: False, _VISITING: False})
    block.to(HOME)
    for p in block.parameters():
        _remember_home(p)
    return block


def stream_blocks(model: nn.Module, blocks: list[nn.Module], device: torch.device) -> nn.Module:
    """Blocks in host memory, streamed to `device`; every other parameter and buffer on `device`."""
    inside = {id(t) for block in blocks for t in list(block.parameters()) + list(block.buffers())}
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for name, tensor in store.items():
                if tensor is not None and id(tensor) not in inside:
                    if isinstance(tensor, nn.Parameter):
                        tensor.data = tensor.data.to(device)
                    else:
                        store[name] = tensor.to(device)
    for block in blocks:
        stream_block(block, device)
    return model


@contextmanager
def resident(block: nn.Module):
    """Hold a streamed block on its accelerator for the whole `with` (no-op for other blocks)."""
    if not is_streamed(block):
        yield block
        return
    block.to(block.__dict__[_DEVICE])
    block.__dict__[_PINNED] = True
    try:
        yield block
    finally:
        block.__dict__[_PINNED] = False
        _send_home(block)
