"""Models bigger than the accelerator: blocks live in host memory and visit the accelerator one at a time.

`stream_blocks` leaves every block in host memory and puts everything else (embeddings, final norm, head,
rotary tables) on the accelerator. A forward pre-hook brings a block over just before it runs and a forward
hook sends it back after, so any code that runs the model (capture, planning probes, evaluation, chat) works
unchanged with inputs on the accelerator, and holds one block there at a time. Work that runs one block many
times (the distillation of a layer) pins it with `resident` for the duration instead of moving it per batch.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

HOME = torch.device("cpu")
_DEVICE, _PINNED, _VISITING = "_lillama_stream_device", "_lillama_pinned", "_lillama_visiting"


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
        block.to(HOME)
        block.__dict__[_VISITING] = False


def stream_block(block: nn.Module, device: torch.device) -> nn.Module:
    """Keep `block` in host memory, running it on `device`; a block copied from a streamed one is already
    streamed and is only sent home."""
    if not is_streamed(block):
        block.register_forward_pre_hook(_arrive, with_kwargs=True)
        block.register_forward_hook(_leave, with_kwargs=True)
    block.__dict__.update({_DEVICE: torch.device(device), _PINNED: False, _VISITING: False})
    return block.to(HOME)


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
        block.to(HOME)
