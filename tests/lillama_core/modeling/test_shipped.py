"""Fused MoE experts become per-expert linears that give the model's own output, and only when they do."""

import torch
import transformers as T
from torch import nn

from lillama_core.modeling.discovery import count_parameters
from lillama_core.modeling.shipped import UnfusedExperts, is_fused_experts, unfuse_experts


def tiny_mixtral(seed=0):
    torch.manual_seed(seed)
    config = T.MixtralConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    return T.MixtralForCausalLM(config).eval()


def test_unfused_experts_give_the_fused_models_logits():
    fused, unfused = tiny_mixtral(), tiny_mixtral()
    params = count_parameters(fused)
    assert unfuse_experts(unfused) == 2
    assert isinstance(unfused.model.layers[1].mlp.experts, UnfusedExperts)
    assert count_parameters(unfused) == params
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(unfused(input_ids=ids).logits, fused(input_ids=ids).logits)


def test_fusing_back_restores_the_original_weights():
    original = tiny_mixtral().model.layers[0].mlp.experts
    gate_up, down = original.gate_up_proj.detach().clone(), original.down_proj.detach().clone()
    refused = UnfusedExperts(original).to_fused(lambda linear: linear.weight.detach())
    assert type(refused) is type(original)
    torch.testing.assert_close(refused.gate_up_proj, gate_up)
    torch.testing.assert_close(refused.down_proj, down)


def test_other_expert_layouts_stay_fused():
    model = tiny_mixtral()
    experts = model.model.layers[0].mlp.experts
    assert is_fused_experts(experts)
    experts.is_transposed = True  # e.g. gpt-oss stores (E, H, 2I) with biases
    assert not is_fused_experts(experts)
    experts.is_transposed = False
    experts.gate_up_proj_bias = nn.Parameter(torch.zeros(4, 96))
    assert not is_fused_experts(experts)


def test_an_expert_bank_whose_output_differs_is_left_fused():
    model = tiny_mixtral()
    experts = model.model.layers[0].mlp.experts
    original_forward = type(experts).forward
    experts.forward = lambda *args: 2 * original_forward(experts, *args)  # routing our copy cannot reproduce
    assert unfuse_experts(model) == 1
    assert model.model.layers[0].mlp.experts is experts
    assert isinstance(model.model.layers[1].mlp.experts, UnfusedExperts)


def test_lowrank_classes_have_their_own_model_type_and_build_the_backbone_from_task_names():
    from lillama_core.modeling.shipped import LowRankLinear, QuantizedLinear, lowrank_config, lowrank_subclass

    config_class = lowrank_config(T.LlamaConfig)
    assert config_class.model_type == "lillama_llama" and issubclass(config_class, T.LlamaConfig)
    config = config_class(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2)
    config.lillama_rank_map = {"model.layers.1.mlp.down_proj": 4, "lm_head": 8}  # names in the task model
    config.lillama_quantization = {"bits": 8, "modules": ["model.layers.0.self_attn.o_proj"]}
    backbone = lowrank_subclass(T.LlamaModel, config_class)(config)
    assert isinstance(backbone.layers[1].mlp.down_proj, LowRankLinear) and backbone.layers[1].mlp.down_proj.rank == 4
    assert isinstance(backbone.layers[0].self_attn.o_proj, QuantizedLinear)
    assert backbone.layers[0].self_attn.o_proj.legacy  # a spec without a version: the hand-written format
    task = lowrank_subclass(T.LlamaForCausalLM, config_class)(config)
    assert isinstance(task.lm_head, LowRankLinear) and isinstance(task.model.layers[1].mlp.down_proj, LowRankLinear)
    config.lillama_quantization = {"version": 2, "group": 64, "modules": {"model.layers.0.self_attn.o_proj": 4,
                                                                         "model.layers.1.mlp.down_proj.B": 8}}
    task = lowrank_subclass(T.LlamaForCausalLM, config_class)(config)
    o_proj, factor = task.model.layers[0].self_attn.o_proj, task.model.layers[1].mlp.down_proj.B
    assert (o_proj.bits, o_proj.group, o_proj.zero.shape, o_proj.legacy) == (4, 32, (32, 1), False)
    assert isinstance(factor, QuantizedLinear) and factor.bits == 8
