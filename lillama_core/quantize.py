"""Weight quantization on top of low-rank compression: int8 dynamic quantization of every linear
layer (the two factors of each low-rank module included) through PyTorch's own torch.ao.

Dynamic int8 runs on the CPU; it stores weights as int8 with per-channel scales and quantizes
activations on the fly, so a student gets smaller twice: fewer weights, and a byte per weight.
"""

from __future__ import annotations

import io

import torch
from torch import nn

from .errors import ConfigError

MODES = ("int8",)


def quantize_weights(model: nn.Module, mode: str = "int8") -> nn.Module:
    """A quantized copy of the model (the original is left as it is)."""
    if mode not in MODES:
        raise ConfigError(f"quantization mode must be one of {', '.join(MODES)}, not {mode!r}")
    if next(model.parameters()).device.type != "cpu":
        raise ConfigError("int8 dynamic quantization runs on the CPU; load the model with --device cpu")
    from torch.ao.quantization import quantize_dynamic
    from torch.ao.quantization.qconfig import per_channel_dynamic_qconfig

    return quantize_dynamic(model.float(), {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8,
                            inplace=False)


def serialized_bytes(model: nn.Module) -> int:
    """Bytes of the model's state as saved: counts packed int8 weights, which parameters() does not see."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes
