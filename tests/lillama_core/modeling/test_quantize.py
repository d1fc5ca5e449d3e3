import pytest
import torch
from tiny import tiny_sequences
from torch import nn
from torchao.prototype.quantization.int4 import Int4OpaqueTensor
from torchao.quantization import Int8Tensor

from lillama_core.compress.loop import Compressor
from lillama_core.config import DistillConfig, PlanConfig
from lillama_core.data.calibration import CalibrationData
from lillama_core.errors import ConfigError
from lillama_core.modeling.quantize import quantize_weights, quantized_storage, serialized_bytes
from lillama_core.modeling.shipped import KernelLinear, NoKernelError, QuantizedLinear, _int4_kernel_tensor
from lillama_core.planning.planner import make_plan


def _sqnr(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: how close the quantized outputs stay."""
    return (10 * torch.log10(reference.pow(2).mean() / (reference - approx).pow(2).mean())).item()


def _stored_weight(q: QuantizedLinear) -> torch.Tensor:
    """The float weight the stored integers stand for: q * scale (int8), (q - 8) * scale + zero per group (int4)."""
    if q.bits == 8:
        return q.qweight.float() * q.scale.float()
    groups = q.int4_values().float().view(q.out_features, -1, q.group) - 8
    return (groups * q.scale.float().unsqueeze(-1) + q.zero.float().unsqueeze(-1)).view(q.out_features, -1)


@pytest.mark.parametrize("bits, columns, group, kernel", [(8, 40, 40, Int8Tensor), (4, 128, 64, Int4OpaqueTensor),
                                                          (4, 96, 32, Int4OpaqueTensor)])
def test_kernels_compute_what_the_stored_integers_say(bits, columns, group, kernel):
    # 20 rows: the CPU int4 kernel packs rows in sixteens, so the tensor pads and slices them
    linear = nn.Linear(columns, 20)
    q = QuantizedLinear.from_linear(linear, bits)
    assert q.group == group
    assert q.qweight.numel() * q.qweight.element_size() == 20 * columns * bits // 8
    layer = q.to_kernel()
    assert isinstance(layer, KernelLinear) and isinstance(layer.weight, kernel)
    x = torch.randn(3, columns)
    with torch.no_grad():
        exact = nn.functional.linear(x, _stored_weight(q), linear.bias)
        tolerance = 1e-5 if bits == 8 else 2e-2  # int4 kernels take bfloat16 activations
        torch.testing.assert_close(layer(x), exact, rtol=tolerance, atol=tolerance)
        assert _sqnr(linear(x), layer(x)) > (35 if bits == 8 else 15)


def test_hqq_int4_is_closer_than_round_to_nearest():
    weight = torch.randn(64, 256) * torch.rand(64, 1)  # rows of different scales, as trained weights have
    linear = nn.Linear(256, 64)
    with torch.no_grad():
        linear.weight.copy_(weight)
    q = QuantizedLinear.from_linear(linear, 4)
    groups = weight.view(64, -1, 64)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    step = (high - low) / 15
    nearest = (torch.round((groups - low) / step) * step + low).view(64, -1)
    assert (_stored_weight(q) - weight).norm() < (nearest - weight).norm()


def test_int4_falls_back_to_int8_where_no_group_divides_the_width():
    model = nn.Sequential(nn.Linear(40, 64), nn.Linear(64, 8))  # 40 columns: neither 64 nor 32 divides them
    stored = quantized_storage(model, "int4")
    assert [m.bits for m in stored] == [8, 4]
    assert isinstance(quantize_weights(model, "int4")[1].weight, Int4OpaqueTensor)


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
        assert isinstance(low.A, KernelLinear) and isinstance(low.B, KernelLinear)  # both factors
        sizes[mode] = serialized_bytes(quantized)
    assert sizes["int4"] < sizes["int8"] < serialized_bytes(student)
    with torch.no_grad():  # the original student is untouched
        torch.testing.assert_close(student(input_ids=ids).logits, reference)

    tied = quantize_weights(tiny.model.__class__(tiny.model.config.__class__.from_dict(
        {**tiny.model.config.to_dict(), "tie_word_embeddings": True})), "int8")
    assert not isinstance(tied.lm_head, KernelLinear)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight


def test_unknown_mode_is_refused(tiny):
    with pytest.raises(ConfigError, match="int8, int4"):
        quantize_weights(tiny.model, "int3")


def test_int4_on_a_device_without_a_kernel_says_so_in_one_line(monkeypatch):
    from lillama_core.modeling import quantize

    values = torch.zeros(16, 64, dtype=torch.uint8, device="meta")
    scale = torch.ones(16, 1, device="meta")
    with pytest.raises(NoKernelError, match="^int4 weights run on a CPU or a CUDA GPU .* not on meta$"):
        _int4_kernel_tensor(values, scale, scale, 64)
    stored = quantized_storage(nn.Sequential(nn.Linear(64, 16)), "int4").to("meta")
    monkeypatch.setattr(quantize, "quantized_storage", lambda model, mode: stored)
    with pytest.raises(ConfigError, match="not on meta$"):  # the user's error: one line, exit status 2
        quantize_weights(stored, "int4")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the tinygemm int4 kernel needs a CUDA GPU")
@pytest.mark.parametrize("bits", [8, 4])
def test_cuda_kernels_compute_what_the_stored_integers_say(bits):
    linear = nn.Linear(96, 20).cuda()  # 96 columns and 20 rows: tinygemm pads both, the tensor slices them off
    q = QuantizedLinear.from_linear(linear, bits)
    layer = q.to_kernel()
    x = torch.randn(3, 96, device="cuda")
    with torch.no_grad():
        exact = nn.functional.linear(x, _stored_weight(q), linear.bias)
        torch.testing.assert_close(layer(x), exact, rtol=2e-2, atol=2e-2)
