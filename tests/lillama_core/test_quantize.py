import pytest
import torch

from lillama_core.calibration import CalibrationData
from lillama_core.config import DistillConfig, PlanConfig
from lillama_core.engine import Compressor, make_plan
from lillama_core.errors import ConfigError
from lillama_core.quantize import quantize_weights, serialized_bytes
from tiny import tiny_sequences


def _sqnr(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: how close the quantized outputs stay."""
    return (10 * torch.log10(reference.pow(2).mean() / (reference - approx).pow(2).mean())).item()


def test_int8_student_is_smaller_and_close_to_the_float_student(tiny):
    plan = make_plan(tiny, PlanConfig(strategy="uniform", rank=16, reduction=None))
    student = Compressor(tiny, CalibrationData(tiny_sequences(8, 16), "r", 0), plan,
                         DistillConfig(distill=False), batch_size=4).run().student
    quantized = quantize_weights(student)
    ids = tiny_sequences(2, 16, seed=4)
    with torch.no_grad():
        reference, approx = student(input_ids=ids).logits, quantized(input_ids=ids).logits
    assert _sqnr(reference, approx) > 20
    from torch.ao.nn.quantized.dynamic import Linear as QuantizedLinear
    low = quantized.model.layers[0].mlp.up_proj
    assert isinstance(low.A, QuantizedLinear) and isinstance(low.B, QuantizedLinear)  # both factors are int8
    assert isinstance(quantized.lm_head, QuantizedLinear)  # dense layers too
    assert serialized_bytes(quantized) < serialized_bytes(student)
    # the original student is untouched
    with torch.no_grad():
        torch.testing.assert_close(student(input_ids=ids).logits, reference)


def test_unknown_mode_is_refused(tiny):
    with pytest.raises(ConfigError, match="int8"):
        quantize_weights(tiny.model, "int3")
