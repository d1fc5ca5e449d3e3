"""Packed factors: the low-rank modules of a block that read one input share one A matmul, found by one forward on
every family, with the unpacked student's outputs in a forward, in cached generation and compiled."""

import copy

import pytest
import torch
from tiny import ARCHITECTURES, tiny_family, tiny_llama, tiny_sequences, tiny_whisper

from lillama_core.config import PlanConfig
from lillama_core.modeling.packs import pack_low_rank, packs_of, shared_input_groups, token_inputs, unpack_low_rank
from lillama_core.modeling.shipped import LowRankLinear, LowRankPack, PackedLowRankLinear, apply_packs, apply_rank_map
from lillama_core.planning.planner import make_plan

QKV, GATE_UP = ("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")
# Leaf names of each pack in one block: fused projections (phi3) and Mamba's mixer read one input per module;
# MoE experts each read their own tokens.
EXPECTED_PACKS = {"phi3": set(), "mamba": set(), "mixtral": {QKV}, "qwen3_moe": {QKV}}


def random_student(loaded):
    """The loaded model with every module a uniform plan compresses made low-rank at uneven ranks (4 to 12, so
    the packs' slices differ), with random factors."""
    plan = make_plan(loaded, PlanConfig(strategy="uniform", rank=8, reduction=None))
    apply_rank_map(loaded.model, {name: 4 + 4 * (i % 3) for i, name in enumerate(sorted(plan.ranks))})
    return loaded.model


def leaf_packs(packs):
    return {tuple(name.rsplit(".", 1)[1] for name in names) for names in packs}


def assert_no_activation_held(model):
    assert all(m.pack._cache is None for m in model.modules() if isinstance(m, PackedLowRankLinear))


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_packed_students_of_every_family_give_the_unpacked_outputs(name):
    loaded = tiny_family(name)
    unpacked = random_student(loaded)
    packed = copy.deepcopy(unpacked)
    packs = pack_low_rank(packed, token_inputs(packed))
    expected = EXPECTED_PACKS.get(name, {QKV, GATE_UP})
    assert leaf_packs(packs) == expected and len(packs) == 2 * len(expected)  # one per block, never across
    assert packs_of(packed) == packs
    assert all(len({name.rsplit(".", 2)[0] for name in names}) == 1 for names in packs)
    vocab = len(loaded.tokenizer) - 2
    ids = tiny_sequences(2, 12, vocab=vocab, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(packed(input_ids=ids).logits, unpacked(input_ids=ids).logits)
    assert_no_activation_held(packed)
    generated = [m.generate(ids[:, :6], attention_mask=torch.ones_like(ids[:, :6]), max_new_tokens=5, do_sample=False,
                            pad_token_id=0, output_scores=True, return_dict_in_generate=True)
                 for m in (packed, unpacked)]
    assert torch.equal(generated[0].sequences, generated[1].sequences)
    torch.testing.assert_close(torch.stack(generated[0].scores), torch.stack(generated[1].scores))
    assert_no_activation_held(packed)


def test_whisper_cross_attention_packs_keys_with_values_but_not_the_decoders_query():
    whisper = tiny_whisper()
    unpacked = random_student(whisper)
    packed = copy.deepcopy(unpacked)
    features = torch.randn(2, 16, 100, generator=torch.Generator().manual_seed(1))
    inputs = {"input_features": features[:1], "decoder_input_ids": torch.tensor([[1, 5, 6, 7]])}
    packs = pack_low_rank(packed, inputs)
    assert leaf_packs(packs) == {QKV, ("k_proj", "v_proj")}
    cross = [names for names in packs if "encoder_attn" in names[0]]
    assert len(cross) == 2 and all(len(names) == 2 for names in cross)  # one per decoder block
    assert type(packed.model.decoder.layers[0].encoder_attn.q_proj) is LowRankLinear
    generated = [m.generate(input_features=features, max_new_tokens=6, do_sample=False, output_scores=True,
                            return_dict_in_generate=True) for m in (packed, unpacked)]
    assert torch.equal(generated[0].sequences, generated[1].sequences)
    torch.testing.assert_close(torch.stack(generated[0].scores), torch.stack(generated[1].scores))
    assert_no_activation_held(packed)


def test_unpacking_restores_the_factors():
    unpacked = random_student(tiny_llama(layers=2))
    packed = copy.deepcopy(unpacked)
    pack_low_rank(packed, token_inputs(packed))
    assert unpack_low_rank(packed) == 10
    assert not packs_of(packed) and not any(isinstance(m, PackedLowRankLinear) for m in packed.modules())
    state, expected = packed.state_dict(), unpacked.state_dict()
    assert state.keys() == expected.keys()
    for key in state:
        torch.testing.assert_close(state[key], expected[key], rtol=0, atol=0)


def test_a_pack_serves_each_input_tensor_its_own_product_and_then_lets_it_go():
    pack = LowRankPack(6, [2, 3])
    first, second = torch.randn(4, 6), torch.randn(4, 6)
    rows = pack.A.weight.detach()
    with torch.no_grad():
        torch.testing.assert_close(pack.part(first, 0), first @ rows[:2].T)
        # another tensor (even interleaved) is computed afresh, never served the first one's product
        torch.testing.assert_close(pack.part(second, 1), second @ rows[2:].T)
        assert pack._cache is not None  # `second` still awaits member 0
        torch.testing.assert_close(pack.part(second, 0), second @ rows[:2].T)
    assert pack._cache is None


def test_modules_called_more_than_once_or_of_other_widths_are_not_packed():
    loaded = tiny_llama(layers=1)
    student = random_student(loaded)
    attention = student.model.layers[0].self_attn
    real = type(attention).forward

    def twice(self, hidden_states, *args, **kwargs):
        self.k_proj(hidden_states * 1.0)  # k reads a second, different tensor
        return real(self, hidden_states, *args, **kwargs)

    type(attention).forward = twice
    try:
        groups = shared_input_groups(student, token_inputs(student))
    finally:
        type(attention).forward = real
    assert leaf_packs(groups) == {("q_proj", "v_proj"), GATE_UP}
    with pytest.raises(ValueError, match="one input width"):
        apply_packs(student, [["model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"]])


def test_a_packed_student_compiles_to_whole_graphs_that_decode_without_recompiling():
    """torch.compile (and CUDA graphs, which capture what it compiles) must see no graph break in a pack and no
    new graph per decoding step: the pack's cache is None at every forward's start and end."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    unpacked = random_student(tiny_llama(layers=2))
    packed = copy.deepcopy(unpacked)
    pack_low_rank(packed, token_inputs(packed))
    packed.forward = torch.compile(packed.forward, backend="eager", fullgraph=True, dynamic=False)
    ids = tiny_sequences(2, 6, seed=4)

    def generate(model, new):
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, pad_token_id=0, cache_implementation="static")

    assert torch.equal(generate(packed, 6), generate(unpacked, 6))
    assert counters["stats"]["unique_graphs"] == 2  # the prefill, and one graph all five decoding steps share
    assert torch.equal(generate(packed, 6), generate(unpacked, 6))
    assert counters["stats"]["unique_graphs"] == 2
    assert_no_activation_held(packed)
    torch._dynamo.reset()
