"""Non-finite values (inf, NaN) never pass silently: tensors are checked where the run records them,
and numbers bound for JSON become null, since `NaN` and `Infinity` are not JSON."""

from __future__ import annotations

import math

import torch

from ..errors import NonFiniteError


def dtype_advice(dtype: torch.dtype) -> str:
    """What to try instead of `dtype`: float16 overflows at 65504, bfloat16 has float32's range."""
    if dtype == torch.float16:
        return "run with --dtype bfloat16 or float32"
    if dtype == torch.bfloat16:
        return "run with --dtype float32"
    return "the model's own weights or computation overflow; check the checkpoint"


def require_finite(tensor: torch.Tensor, where: str, what: str = "activations",
                   dtype: torch.dtype | None = None) -> None:
    """Raise NonFiniteError("{where} produced inf/NaN {what} in {dtype}: {advice}") unless every value of
    `tensor` is finite. `dtype` is the run's dtype (default: the tensor's)."""
    if not torch.isfinite(tensor).all():
        dtype = dtype or tensor.dtype
        name = str(dtype).replace("torch.", "")
        verb = "has" if what == "weights" else "produced"
        raise NonFiniteError(f"{where} {verb} inf/NaN {what} in {name}: {dtype_advice(dtype)}")


def json_safe(value):
    """`value` with every non-finite float (also inside dicts, lists and tuples) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def require_finite_weights(module: torch.nn.Module, names: list[str], where: str, dtype: torch.dtype) -> None:
    """NonFiniteError unless the weight of every named submodule of `module` is finite, checked before
    anything is factorised (an inf in a float16 copy of a large weight would end in a LinAlgError)."""
    for name in names:
        require_finite(module.get_submodule(name).weight, f"{where} module {name}", "weights", dtype)
