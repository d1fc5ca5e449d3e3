"""Weight-only quantization on top of low-rank compression: every linear layer (both factors of each
low-rank module included) stores int8 weights with one scale per output channel, or int4 weights
packed two to a byte with one scale per group of input columns. Activations stay in floating point,
so quality depends on the weights alone; the weights are dequantized inside each forward, on any device.

A head tied to the input embeddings is left as it is: quantizing it would untie it and store a copy.
"""

from __future__ import annotations

import copy
import io
from collections import Counter

import torch
from torch import nn

from ..errors import ConfigError
from .shipped import INT4_GROUP, QuantizedLinear, set_submodule

MODES = {"int8": 8, "int4": 4}
__all__ = ["MODES", "INT4_GROUP", "QuantizedLinear", "quantize_weights", "quantized_modules", "serialized_bytes"]


def quantize_weights(model: nn.Module, mode: str = "int8") -> nn.Module:
    """A quantized copy of the model (the original is left as it is)."""
    if mode not in MODES:
        raise ConfigError(f"quantization mode must be one of {', '.join(MODES)}, not {mode!r}")
    quantized = copy.deepcopy(model)
    users = Counter(id(p) for module in quantized.modules() for p in module.parameters(recurse=False))
    targets = [name for name, module in quantized.named_modules()
               if isinstance(module, nn.Linear) and users[id(module.weight)] == 1]
    for name in targets:
        set_submodule(quantized, name, QuantizedLinear.from_linear(quantized.get_submodule(name), MODES[mode]))
    return quantized


def quantized_modules(model: nn.Module) -> dict:
    """What an export records to rebuild the quantized layers before loading: bits, group size, names."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    if not layers:
        return {}
    first = next(iter(layers.values()))
    return {"bits": first.bits, "group": INT4_GROUP, "modules": sorted(layers)}


def serialized_bytes(model: nn.Module) -> int:
    """Bytes of the model's state as saved (integer weights count one byte, or half of one, each)."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes
