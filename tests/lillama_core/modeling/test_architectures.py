"""Compress -> export -> reload on tiny random models of every architecture the engine supports,
with grouped-query attention, tied embeddings, biases and rotary variants."""

import pytest
import torch
import transformers as T
from tiny import ARCHITECTURES, tiny_family, tiny_sequences

from lillama_core.compress.loop import Compressor
from lillama_core.config import DistillConfig, PlanConfig
from lillama_core.data.calibration import CalibrationData
from lillama_core.export import export_student, load_compressed
from lillama_core.modeling.discovery import find_blocks, find_linears, module_group
from lillama_core.modeling.shipped import LowRankLinear
from lillama_core.planning.planner import make_plan

EXPECTED_GROUPS = {"mixtral": {"attention", "experts"}, "qwen3_moe": {"attention", "experts"}, "mamba": {"ssm"}}


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_compress_export_reload(name, tmp_path):
    loaded = tiny_family(name)
    blocks = find_blocks(loaded.model)
    assert len(blocks) == 2
    groups = {module_group(n) for n in find_linears(blocks[0].module)}
    assert groups >= EXPECTED_GROUPS.get(name, {"attention", "mlp"})
    vocab = len(loaded.tokenizer) - 2
    calibration = CalibrationData(tiny_sequences(12, 32, vocab=vocab), "random", 0)
    plan = make_plan(loaded, PlanConfig(strategy="uniform", rank=8, reduction=None))
    assert plan.ranks and {module_group(n.split(".", 3)[-1]) for n in plan.ranks} == EXPECTED_GROUPS.get(
        name, {"attention", "mlp"})
    student = Compressor(loaded, calibration, plan, DistillConfig(), batch_size=4).run().student
    assert sum(isinstance(m, LowRankLinear) for m in student.modules()) == len(plan.ranks)

    ids = tiny_sequences(2, 12, vocab=vocab, seed=3)
    with torch.no_grad():
        expected = student(input_ids=ids).logits
    folder = export_student(student, loaded.tokenizer, tmp_path / name)
    reloaded, _ = load_compressed(folder)
    remote = T.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    merged = T.AutoModelForCausalLM.from_pretrained(export_student(student, loaded.tokenizer, tmp_path / "dense",
                                                                   merge=True))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected)
        torch.testing.assert_close(remote(input_ids=ids).logits, expected)
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)
    if getattr(loaded.model.config, "tie_word_embeddings", False):
        assert reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight


def test_biases_survive_factorisation():
    loaded = tiny_family("qwen2")
    q = loaded.model.model.layers[0].self_attn.q_proj
    assert q.bias is not None
    plan = make_plan(loaded, PlanConfig(strategy="uniform", rank=8, reduction=None))
    student = Compressor(loaded, CalibrationData(tiny_sequences(8, 16, vocab=300), "r", 0), plan,
                         DistillConfig(train=False), batch_size=4).run().student
    low = student.model.layers[0].self_attn.q_proj
    assert isinstance(low, LowRankLinear)
    torch.testing.assert_close(low.B.bias, q.bias)
