import pytest
import torch
from tiny import tiny_sequences
from torch import nn

from lillama_core.compress.loop import Compressor
from lillama_core.config import DistillConfig, PlanConfig
from lillama_core.data.calibration import CalibrationData
from lillama_core.errors import ConfigError
from lillama_core.modeling.quantize import quantize_weights, serialized_bytes
from lillama_core.modeling.shipped import QuantizedLinear
from lillama_core.planning.planner import make_plan


def _sqnr(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: how close the quantized outputs stay."""
    return (10 * torch.log10(reference.pow(2).mean() / (reference - approx).pow(2).mean())).item()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("columns, int4_bytes_per_row", [(200, 256 // 2), (9, 10 // 2)])
def test_weights_round_trip_within_half_a_step(bits, columns, int4_bytes_per_row):
    # 200 columns: int4 groups of 64 need padding; 9 (a low-rank B factor): one group, not one padded to 64
    linear = nn.Linear(columns, 48)
    q = QuantizedLinear.from_linear(linear, bits)
    error = (q.dequantized() - linear.weight).abs()
    steps = q.scale.float().repeat_interleave(q.group, dim=1)[:, :columns]
    assert (error <= steps / 2 + 1e-6).all()
    x = torch.randn(3, columns)
    assert _sqnr(linear(x), q(x)) > (35 if bits == 8 else 15)
    assert q.qweight.element_size() * q.qweight.numel() == 48 * (columns if bits == 8 else int4_bytes_per_row)
    if columns > 64:
        assert serialized_bytes(nn.Sequential(q)) < serialized_bytes(nn.Sequential(linear)) / (3 if bits == 8 else 4)


def test_quantized_student_is_smaller_close_and_keeps_tied_heads(tiny):
    plan = make_plan(tiny, PlanConfig(strategy="uniform", rank=16, reduction=None))
    student = Compressor(tiny, CalibrationData(tiny_sequences(8, 16), "r", 0), plan,
                         DistillConfig(train=False), batch_size=4).run().student
    ids = tiny_sequences(2, 16, seed=4)
    with torch.no_grad():
        reference = student(input_ids=ids).logits
    sizes = {}
    for mode, min_sqnr in (("int8", 25), ("int4", 8)):
        quantized = quantize_weights(student, mode)
        with torch.no_grad():
            assert _sqnr(reference, quantized(input_ids=ids).logits) > min_sqnr, mode
        low = quantized.model.layers[0].mlp.up_proj
        assert isinstance(low.A, QuantizedLinear) and isinstance(low.B, QuantizedLinear)  # both factors
        sizes[mode] = serialized_bytes(quantized)
    assert max(sizes.values()) < serialized_bytes(student)
    with torch.no_grad():  # the original student is untouched
        torch.testing.assert_close(student(input_ids=ids).logits, reference)

    tied = quantize_weights(tiny.model.__class__(tiny.model.config.__class__.from_dict(
        {**tiny.model.config.to_dict(), "tie_word_embeddings": True})), "int8")
    assert not isinstance(tied.lm_head, QuantizedLinear)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight


def test_unknown_mode_is_refused(tiny):
    with pytest.raises(ConfigError, match="int8, int4"):
        quantize_weights(tiny.model, "int3")
