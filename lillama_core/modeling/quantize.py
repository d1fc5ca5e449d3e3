"""Weight-only quantization on top of low-rank compression, with torchao's integer kernels: every linear layer
(both factors of each low-rank module included) gets int8 weights with one scale per output channel, or int4
weights in groups of 64 input columns (32 where 64 does not divide the width) chosen by HQQ, which needs no
calibration data. A layer whose input width no int4 group divides (a low-rank B factor of rank 40, say) stays
int8. Activations stay in floating point, so quality depends on the weights alone.

Kernels (torchao 0.18): int8 is `Int8Tensor` (an int8 -> float cast and a float matmul in eager mode, on any
device); int4 is `Int4OpaqueTensor` on a CPU (torch's `_weight_int4pack_mm_for_cpu`, bfloat16 activations) and
`Int4TilePackedTo4dTensor` on a CUDA GPU of compute capability 8.0+ (tinygemm). Exports store the integers in a
portable layout (shipped.QuantizedLinear) and pack them for the device they load on.

A head tied to the input embeddings is left as it is: quantizing it would untie it and store a copy.
"""

from __future__ import annotations

import copy
import io
from collections import Counter

import torch
from torch import nn

from ..errors import ConfigError
from .shipped import INT4_GROUP, NoKernelError, QuantizedLinear, int4_group, pack_quantized, set_submodule

MODES = {"int8": 8, "int4": 4}
__all__ = ["MODES", "INT4_GROUP", "quantize_weights", "quantized_storage", "quantized_modules", "serialized_bytes"]


def quantized_storage(model: nn.Module, mode: str = "int8") -> nn.Module:
    """A copy of the model whose untied linears are QuantizedLinear (portable integers, what an export saves);
    the original is left as it is. Raises ConfigError for an unknown mode."""
    if mode not in MODES:
        raise ConfigError(f"quantization mode must be one of {', '.join(MODES)}, not {mode!r}")
    quantized = copy.deepcopy(model)
    users = Counter(id(p) for module in quantized.modules() for p in module.parameters(recurse=False))
    targets = [name for name, module in quantized.named_modules()
               if isinstance(module, nn.Linear) and users[id(module.weight)] == 1]
    for name in targets:
        linear = quantized.get_submodule(name)
        bits = 4 if MODES[mode] == 4 and int4_group(linear.in_features) else 8
        set_submodule(quantized, name, QuantizedLinear.from_linear(linear, bits))
    return quantized


def quantize_weights(model: nn.Module, mode: str = "int8") -> nn.Module:
    """A quantized copy of the model running torchao kernels on its device (the original is left as it is).
    Raises ConfigError for an unknown mode or a device without an int4 kernel."""
    try:
        return pack_quantized(quantized_storage(model, mode))
    except NoKernelError as exc:
        raise ConfigError(str(exc)) from None


def quantized_modules(model: nn.Module) -> dict:
    """What an export records to rebuild a `quantized_storage` model's integer layers before loading: the format
    version, the int4 group size and the bits of each named layer."""
    layers = {name: m.bits for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    return {"version": 2, "group": INT4_GROUP, "modules": layers} if layers else {}


def serialized_bytes(model: nn.Module) -> int:
    """Bytes of the model's state as `torch.save` writes it (integer weights count one byte, or half of one,
    each, plus their scales)."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes
