"""The speed suite's decoding paths and its random-weight subjects, on tiny shapes."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks import suites, throughput  # noqa: E402
from benchmarks.bench import Budget  # noqa: E402
from benchmarks.methods import recipe  # noqa: E402
from benchmarks.report import generated_markdown  # noqa: E402
from lillama_core.modeling.shipped import LowRankLinear  # noqa: E402

TINY = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=256)


def _tiny_shape(monkeypatch):
    monkeypatch.setitem(throughput.SHAPES, "llama-tiny", TINY)


def test_a_random_weight_student_has_aligned_uniform_ranks_at_its_target(monkeypatch):
    _tiny_shape(monkeypatch)
    teacher, _ = suites._random_weight_subject("llama-tiny", recipe("teacher"), 0.0, "cpu", "float32")
    student, info = suites._random_weight_subject("llama-tiny", recipe("ours"), 0.3, "cpu", "float32")
    assert not any(isinstance(m, LowRankLinear) for m in teacher.modules())
    ranks = {m.rank for m in student.modules() if isinstance(m, LowRankLinear)}
    # "ours" plans by sensitivity, which needs real data; on random weights it becomes uniform, same multiple
    assert info["plan_strategy"] == "uniform" and info["rank_multiple"] == 8
    assert ranks and all(r % 8 == 0 for r in ranks)
    assert abs(info["reduction"] - 0.3) < 0.02
    kept = sum(p.numel() for p in student.parameters()) / sum(p.numel() for p in teacher.parameters())
    assert abs((1 - kept) - info["reduction"]) < 1e-9


def test_speed_worker_times_compiled_static_cache_decoding_and_the_report_shows_it(monkeypatch, tmp_path):
    from transformers import CompileConfig

    from lillama_core.runtime import graphs

    _tiny_shape(monkeypatch)
    # traced by dynamo and run eagerly: the worker's bookkeeping in seconds, not inductor's minutes
    monkeypatch.setattr(graphs, "compile_config", lambda device: CompileConfig(backend="eager", mode="default"))
    records = [suites.speed_worker("llama-tiny", method, reduction, Budget(), "cpu", "float32", 4, 1, graphs=True)
               for method, reduction in (("teacher", 0.0), ("ours", 0.3))]
    for record in records:
        record.update(suite="speed", timestamp="t")
        assert record["model"] == "llama-tiny (random weights)"
        for batch in (1, 16):
            graph = record["details"][f"graph_batch{batch}"]
            assert graph["batch_size"] == batch and graph["compile_mode"] == "default"
            assert graph["warm_up_seconds"] > 0 and record[f"graph_b{batch}_peak_delta_bytes"] is not None
            assert record[f"graph_b{batch}_tokens_per_s"] == graph["generate_tokens_per_s"] > 0
    teacher, student = records
    assert student["params"] < teacher["params"] and student["plan_strategy"] == "uniform"
    text = generated_markdown(records, tmp_path)
    assert "gen tok/s b=16, compiled static cache (CUDA graphs on a GPU) |" in text
    ratio = student["graph_b16_tokens_per_s"] / teacher["graph_b16_tokens_per_s"]
    assert f"| {student['graph_b16_tokens_per_s']:.1f} ({ratio:.2f}×) |" in text



def test_a_packed_student_runs_one_matmul_per_pack_for_its_a_factors(monkeypatch):
    from benchmarks.kernels import kernels_per_block
    from lillama_core.modeling.packs import pack_low_rank, token_inputs

    _tiny_shape(monkeypatch)
    teacher, _ = suites._random_weight_subject("llama-tiny", recipe("teacher"), 0.0, "cpu", "float32")
    student, _ = suites._random_weight_subject("llama-tiny", recipe("ours"), 0.5, "cpu", "float32")
    low_rank = sum(isinstance(m, LowRankLinear) for m in student.model.layers[0].modules())
    unpacked = kernels_per_block(student)["matmuls"]
    packs = [names for names in pack_low_rank(student, token_inputs(student)) if ".layers.0." in names[0]]
    assert kernels_per_block(teacher)["matmuls"] == 7 and unpacked == 7 + low_rank
    assert kernels_per_block(student)["matmuls"] == unpacked - sum(len(names) - 1 for names in packs) < unpacked


def test_kernel_counts_are_averaged_over_every_block_not_read_from_the_first(monkeypatch):
    from benchmarks.kernels import kernels_per_block, mean_kernels_per_block
    from lillama_core.modeling.shipped import apply_rank_map

    _tiny_shape(monkeypatch)
    model, _ = suites._random_weight_subject("llama-tiny", recipe("teacher"), 0.0, "cpu", "float32")
    last = len(model.model.layers) - 1
    apply_rank_map(model, {f"model.layers.{last}.mlp.down_proj": 8})  # only the last block gets a low-rank module
    per_block = [kernels_per_block(model, i)["matmuls"] for i in range(last + 1)]
    assert per_block[0] == 7 and per_block[last] == 8
    assert mean_kernels_per_block(model)["matmuls"] == sum(per_block) / len(per_block)
