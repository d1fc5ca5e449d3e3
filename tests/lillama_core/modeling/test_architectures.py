"""Compress -> export -> reload on tiny random models of every architecture the engine supports,
with grouped-query attention, tied embeddings, biases and rotary variants."""

import pytest
import torch
import transformers as T
from tiny import tiny_sequences, tiny_tokenizer

from lillama_core.compress.loop import Compressor
from lillama_core.config import DistillConfig, PlanConfig
from lillama_core.data.calibration import CalibrationData
from lillama_core.export import export_student, load_compressed
from lillama_core.modeling.discovery import find_blocks, find_linears, module_group
from lillama_core.modeling.loading import LoadedModel
from lillama_core.modeling.shipped import LowRankLinear, unfuse_experts
from lillama_core.planning.planner import make_plan

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)
ARCHITECTURES = {
    "llama": (T.LlamaConfig, T.LlamaForCausalLM, dict(COMMON, tie_word_embeddings=True, attention_bias=True)),
    "mistral": (T.MistralConfig, T.MistralForCausalLM, dict(COMMON, sliding_window=16)),
    "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM, dict(COMMON, tie_word_embeddings=True)),  # q/k/v biases
    "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM, dict(COMMON, head_dim=16)),  # q/k norms
    "phi3": (T.Phi3Config, T.Phi3ForCausalLM, dict(COMMON, pad_token_id=0, partial_rotary_factor=0.5)),  # fused qkv
    "gemma3": (T.Gemma3TextConfig, T.Gemma3ForCausalLM, dict(COMMON, head_dim=16, sliding_window=8)),
    "mixtral": (T.MixtralConfig, T.MixtralForCausalLM, dict(COMMON, num_local_experts=4, num_experts_per_tok=2)),
    "qwen3_moe": (T.Qwen3MoeConfig, T.Qwen3MoeForCausalLM, dict(COMMON, head_dim=16, num_experts=4,
                                                                num_experts_per_tok=2, moe_intermediate_size=32)),
    "mamba": (T.MambaConfig, T.MambaForCausalLM, dict(hidden_size=64, num_hidden_layers=2, state_size=8)),
}
EXPECTED_GROUPS = {"mixtral": {"attention", "experts"}, "qwen3_moe": {"attention", "experts"}, "mamba": {"ssm"}}


def build(name):
    config_cls, model_cls, kwargs = ARCHITECTURES[name]
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    model = model_cls(config_cls(vocab_size=len(tokenizer), **kwargs)).eval()
    unfuse_experts(model)  # as load_model does: fused MoE experts become linears the planner can see
    return LoadedModel(model, tokenizer, name, "random", torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_compress_export_reload(name, tmp_path):
    loaded = build(name)
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
    loaded = build("qwen2")
    q = loaded.model.model.layers[0].self_attn.q_proj
    assert q.bias is not None
    plan = make_plan(loaded, PlanConfig(strategy="uniform", rank=8, reduction=None))
    student = Compressor(loaded, CalibrationData(tiny_sequences(8, 16, vocab=300), "r", 0), plan,
                         DistillConfig(train=False), batch_size=4).run().student
    low = student.model.layers[0].self_attn.q_proj
    assert isinstance(low, LowRankLinear)
    torch.testing.assert_close(low.B.bias, q.bias)
