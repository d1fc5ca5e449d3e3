"""Decoding through a static KV cache with the decode step compiled (runtime/graphs.py), on tiny random models.

The step is traced by dynamo whole (fullgraph: a graph break would fail here, and on a GPU would split the CUDA
graphs) but run by the "eager" backend, so a test costs seconds instead of inductor's minutes of C++ compiling."""

import threading

import pytest
import torch
from tiny import tiny_llama, tiny_sequences

from lillama_core.chat import SamplingConfig, decode, stream_chat
from lillama_core.modeling.shipped import LowRankLinear, apply_rank_map
from lillama_core.runtime import graphs
from lillama_core.runtime.graphs import WARM_UP_NOTE, GraphDecoder, cache_positions


def traced(model, **kw) -> GraphDecoder:
    from transformers import CompileConfig

    return GraphDecoder(model, CompileConfig(backend="eager", mode="default", fullgraph=True), **kw)


@pytest.fixture(scope="module")
def student():
    """A tiny Llama whose attention and MLP linears are low-rank factors (the shapes our students have)."""
    model = tiny_llama(layers=2).model
    apply_rank_map(model, {name: 8 for name, module in model.named_modules()
                           if isinstance(module, torch.nn.Linear) and ".layers." in name})
    assert any(isinstance(m, LowRankLinear) for m in model.modules())
    return model


def tokens(model, ids, sampling, decoder=None) -> torch.Tensor:
    return torch.stack(list(decode(model, ids, sampling, graphs=decoder)), dim=1)


def test_static_cache_decoding_gives_the_eager_loops_greedy_tokens_and_seeded_samples(student):
    decoder = traced(student)
    ids = tiny_sequences(3, 12)
    greedy = SamplingConfig(max_new_tokens=10, temperature=0, repetition_penalty=1.0)
    assert torch.equal(tokens(student, ids, greedy, decoder), tokens(student, ids, greedy))
    sampled = SamplingConfig(max_new_tokens=10, temperature=1.5, top_k=0, top_p=1.0, seed=7)
    first = tokens(student, ids, sampled, decoder)
    assert torch.equal(first, tokens(student, ids, sampled))  # the same generator draws, token for token
    assert torch.equal(first, tokens(student, ids, sampled, decoder))  # the reused cache starts clean
    other_seed = tokens(student, ids, SamplingConfig(max_new_tokens=10, temperature=1.5, top_k=0, top_p=1.0, seed=8),
                        decoder)
    assert not torch.equal(first, other_seed)


def test_warm_up_is_announced_once_per_shape_and_the_compiled_step_is_reused_between_turns(monkeypatch):
    tiny = tiny_llama(layers=2)
    notes = []
    decoder = traced(tiny.model, on_warm_up=notes.append)
    compiled = []
    real = decoder._compiled
    monkeypatch.setattr(decoder, "_compiled", lambda **kw: compiled.append(1) or real(**kw))
    sampling = SamplingConfig(max_new_tokens=6, temperature=0)
    first = list(stream_chat(tiny.model, tiny.tokenizer, "The quick", sampling, graphs=decoder))
    assert first[0].note == WARM_UP_NOTE and first[0].new_tokens == 0 and not first[0].text
    assert not any(u.note for u in first[1:]) and first[-1].done and first[-1].tokens_per_s > 0
    assert notes == [WARM_UP_NOTE]
    steps = len(compiled)
    second = list(stream_chat(tiny.model, tiny.tokenizer, "brown fox", sampling, graphs=decoder))  # next turn
    assert not any(u.note for u in second) and notes == [WARM_UP_NOTE]
    assert len(compiled) - steps == second[-1].new_tokens - 1  # every token after the prefill's: compiled
    long = SamplingConfig(max_new_tokens=cache_positions(1) + 1, temperature=0)
    assert decoder.needs_warm_up(1, 2 + long.max_new_tokens)  # a longer answer needs a bigger cache
    assert list(stream_chat(tiny.model, tiny.tokenizer, "x", long, graphs=decoder))[0].note == WARM_UP_NOTE
    assert notes == [WARM_UP_NOTE] * 2


def test_a_stop_request_ends_compiled_decoding_between_tokens(student):
    decoder = traced(student)
    stop = threading.Event()
    produced = []
    sampling = SamplingConfig(max_new_tokens=40, temperature=0, repetition_penalty=1.0)
    for token in decode(student, tiny_sequences(1, 8), sampling, stop=stop, graphs=decoder):
        produced.append(token)
        if len(produced) == 3:
            stop.set()
    assert len(produced) == 3
    # the session ended with the generator, so the next one starts at once
    assert len(list(decode(student, tiny_sequences(1, 8), SamplingConfig(max_new_tokens=2, temperature=0),
                           graphs=decoder))) == 2


def test_cache_positions_are_powers_of_two_from_a_floor():
    assert cache_positions(1) == cache_positions(graphs.MIN_CACHE_POSITIONS) == graphs.MIN_CACHE_POSITIONS
    assert cache_positions(graphs.MIN_CACHE_POSITIONS + 1) == 2 * graphs.MIN_CACHE_POSITIONS
    assert cache_positions(1000) == 1024


def test_cuda_graphs_on_a_gpu_and_inductor_elsewhere():
    assert graphs.compile_config(torch.device("cuda")).mode == "reduce-overhead"
    assert graphs.compile_config(torch.device("cpu")).mode == "default"


def test_returning_to_a_shape_compiled_earlier_decodes_on_a_cache_of_that_shape(student):
    decoder = traced(student)
    greedy = SamplingConfig(max_new_tokens=6, temperature=0, repetition_penalty=1.0)
    one, three = tiny_sequences(1, 12), tiny_sequences(3, 12, seed=4)
    assert torch.equal(tokens(student, one, greedy, decoder), tokens(student, one, greedy))
    assert torch.equal(tokens(student, three, greedy, decoder), tokens(student, three, greedy))
    assert torch.equal(tokens(student, one, greedy, decoder), tokens(student, one, greedy))  # batch 1 is warm already
