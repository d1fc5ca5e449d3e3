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
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .lowrank import set_submodule

MODES = {"int8": 8, "int4": 4}
INT4_GROUP = 64


class QuantizedLinear(nn.Module):
    """A linear layer with symmetric integer weights: int8 per output channel, or int4 per group."""

    def __init__(self, linear: nn.Linear, bits: int, group_size: int = INT4_GROUP):
        super().__init__()
        weight = linear.weight.detach().float()
        self.out_features, self.in_features = weight.shape
        self.bits = bits
        self.group = self.in_features if bits == 8 else group_size
        padded = F.pad(weight, (0, -self.in_features % self.group)).view(self.out_features, -1, self.group)
        qmax = 2 ** (bits - 1) - 1
        # The scale is rounded to its stored precision before use, so dequantizing is exact to half a step.
        scale = (padded.abs().amax(-1, keepdim=True) / qmax).to(torch.float16).float().clamp_min(2**-24)
        q = torch.clamp(torch.round(padded / scale), -qmax - 1, qmax).to(torch.int16).view(self.out_features, -1)
        if bits == 4:  # two signed nibbles per byte, offset to 0..15
            q = (q[:, 0::2] + 8) | ((q[:, 1::2] + 8) << 4)
            self.register_buffer("qweight", q.to(torch.uint8))
        else:
            self.register_buffer("qweight", q.to(torch.int8))
        self.register_buffer("scale", scale.squeeze(-1).to(torch.float16))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def dequantized(self) -> torch.Tensor:
        q = self.qweight
        if self.bits == 4:
            q = torch.stack(((q & 0xF).to(torch.int8) - 8, (q >> 4).to(torch.int8) - 8), dim=-1)
        w = q.view(self.out_features, -1, self.group).float() * self.scale.float().unsqueeze(-1)
        return w.view(self.out_features, -1)[:, : self.in_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized().to(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int{self.bits}, group={self.group}"


def quantize_weights(model: nn.Module, mode: str = "int8") -> nn.Module:
    """A quantized copy of the model (the original is left as it is)."""
    if mode not in MODES:
        raise ConfigError(f"quantization mode must be one of {', '.join(MODES)}, not {mode!r}")
    quantized = copy.deepcopy(model)
    users = Counter(id(p) for module in quantized.modules() for p in module.parameters(recurse=False))
    targets = [name for name, module in quantized.named_modules()
               if isinstance(module, nn.Linear) and users[id(module.weight)] == 1]
    for name in targets:
        set_submodule(quantized, name, QuantizedLinear(quantized.get_submodule(name), MODES[mode]))
    return quantized


def serialized_bytes(model: nn.Module) -> int:
    """Bytes of the model's state as saved (integer weights count one byte, or half of one, each)."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes
