"""The benchmark harness's own logic: recipes, ablation axes and the generated report."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.methods import METHODS, recipe  # noqa: E402
from benchmarks.report import generated_markdown  # noqa: E402
from benchmarks.run import _parse_sets  # noqa: E402
from benchmarks.suites import ablation_variants  # noqa: E402
from lillama_core.config import DistillConfig, PlanConfig  # noqa: E402


def _quality(method, reduction, ppl, tokens=16384, **extra):
    return {"suite": "quality", "timestamp": f"2026-01-01T00:00:{int(reduction * 100):02d}", "model": "m",
            "device": "cpu", "eval": {"tokens": 8192, "seq_len": 512}, "method": method,
            "target_reduction": reduction, "reduction": reduction, "params_after": 100e6, "tokens": tokens,
            "ppl": ppl, **extra}


def test_ours_tracks_the_engine_defaults_and_the_paper_recipe_is_the_published_one():
    assert recipe("ours").plan_config(0.2) == PlanConfig(reduction=0.2)
    assert recipe("ours").distill_config() == DistillConfig()
    paper = recipe("paper")
    assert paper.plan_config(0.2).strategy == "bottom"
    assert (paper.distill_config().init, paper.distill_config().lr, paper.distill_config().loss) == ("svd", 8.6e-5,
                                                                                                    "joint")
    assert all(not METHODS[m].distill_config().train for m in ("svd", "whitened"))
    assert all(METHODS[m].plan_config(0.2).rank_multiple == 1 for m in ("svd", "whitened", "paper"))
    with pytest.raises(SystemExit, match="unknown method"):
        recipe("nope")
    aligned = recipe("ours-r8")
    assert aligned.plan_config(0.2) == PlanConfig(reduction=0.2, rank_multiple=8) and aligned.name == "ours-r8"
    assert aligned.distill_config() == DistillConfig()
    for bad in ("ours-r0", "ours-rx"):
        with pytest.raises(SystemExit, match="unknown method"):
            recipe(bad)


def test_allocation_axis_parses_protected_layers_and_free_variants():
    variants = ablation_variants("allocation", recipe("tuned"), ["energy+L0+last", "bottom"], True, "m")
    (label, r, tokens), (label2, r2, _) = variants
    assert label == "energy+L0+last dense (no training)" and tokens is None
    assert r.plan["strategy"] == "energy" and set(r.plan["overrides"]) == {"*.layers.0.*", "*.layers.{last}.*"}
    assert r.distill["train"] is False and r2.plan["strategy"] == "bottom"
    with pytest.raises(SystemExit):
        ablation_variants("allocation", recipe("tuned"), ["uniform+X"], False, "m")
    (label, healed, _), = ablation_variants("heal", recipe("ours"), ["16384"], False, "m")
    assert label == "heal=16384" and healed.heal_config().tokens == 16384 and recipe("ours").heal_config().tokens == 0
    assert _parse_sets(["distill.lr=1e-3", "plan.strategy=top"]) == {"distill": {"lr": 1e-3},
                                                                     "plan": {"strategy": "top"}}


def test_set_values_are_typed_by_their_config_field_and_unknown_ones_stop_the_suite():
    assert _parse_sets(["plan.rank=none", "distill.keep_best=false", "plan.rank_multiple=8"]) == {
        "plan": {"rank": None, "rank_multiple": 8}, "distill": {"keep_best": False}}
    for bad in ("distill.learning_rate=1", "distill.epochs=two", "heal.lr=1e-4"):
        with pytest.raises(SystemExit):
            _parse_sets([bad])


def test_report_tables_hold_every_measured_cell(tmp_path):
    records = [_quality("teacher", 0.0, 29.6), _quality("whitened", 0.2, 120.2), _quality("ours", 0.2, 47.81),
               _quality("ours", 0.4, 80.5),
               {"suite": "throughput", "timestamp": "t", "model": "llama-7b (random weights)", "device": "cuda",
                "dtype": "bfloat16", "params": 6.74e9, "weight_bytes": 12.6 * 2**30, "layers_compressed": 3,
                "init": "random", "train_tokens_per_layer": 61440, "layer_seconds": [3.0, 1.5, 1.5],
                "distill_tokens_per_s": 30720, "mfu": 0.033, "peak_allocated_bytes": 18.5 * 2**30,
                "peak_over_weights": 1.47, "env": {"gpu": "NVIDIA H100"}},
               {"suite": "speech", "timestamp": "t", "method": "teacher", "reduction": 0.0, "wer": 0.088,
                "wer_scorer": "jiwer corpus, x", "transcript_ppl": 1.92, "transcribe_tokens_per_s": 7.2,
                "device": "cpu"},
               {"suite": "speech", "timestamp": "t", "method": "ours", "calibration": "synthetic",
                "target_reduction": 0.2, "reduction": 0.201, "wer": 0.214, "wer_scorer": "jiwer corpus, x",
                "transcript_ppl": 3.5, "transcribe_tokens_per_s": 8.1, "compress_seconds": 312.0, "device": "cpu"},
               {"suite": "speech", "timestamp": "u", "method": "ours", "calibration": "speech",  # per-clip mean
                "target_reduction": 0.2, "reduction": 0.2, "wer": 0.239, "transcript_ppl": 2.3,
                "transcribe_tokens_per_s": 31.5, "compress_seconds": 838.0, "device": "cpu"}]
    text = generated_markdown(records, tmp_path)
    # One column per measured reduction; a method missing at one reduction leaves its cell empty.
    assert "| method | 20% | 40% |" in text and "| ours | 47.81 | 80.50 |" in text
    assert "| whitened | 120.20 |  |" in text
    assert "teacher 29.60" in text
    assert "| llama-7b (random weights) | NVIDIA H100, bfloat16 | built in memory | 6.74B |" in text
    assert "| 3.3% |" in text
    assert "| teacher | – | 0.0% | 8.8% | 1.92 | 7 | – | cpu |" in text
    assert "| ours | synthetic clips | 20.1% | 21.4% | 3.50 | 8 | 312 | cpu |" in text
    assert "23.9%" not in text and "scorer: jiwer corpus, x;" in text  # an old per-clip mean stays out
    assert (tmp_path / "benchmarks_ppl.svg").read_text().startswith("<svg")


def test_quantization_table_has_the_four_models(tmp_path):
    record = _quality("ours", 0.2, 47.81, teacher_ppl=29.6, teacher_bytes=538 * 2**20,
                      teacher_int8_bytes=231 * 2**20, teacher_int8_ppl=30.4, student_bytes=430 * 2**20,
                      student_int8_bytes=190 * 2**20, student_int8_ppl=49.0, teacher_int4_bytes=140 * 2**20,
                      teacher_int4_ppl=33.1, student_int4_bytes=120 * 2**20, student_int4_ppl=55.2,
                      teacher_generate_tokens_per_s=31.5, student_int8_generate_tokens_per_s=12.0,
                      student_int8_b16_generate_tokens_per_s=90.0, student_int8_prefill_tokens_per_s=400.0,
                      student_int8_layer_us=120.0, student_int8_b16_layer_us=300.0)
    record["suite"] = "quantize"
    text = generated_markdown([record], tmp_path)
    assert "| teacher | 538 | 29.60 | 31.5 | – | – | – |" in text and "| teacher int8 | 231 | 30.40 | – |" in text
    assert "| student | 430 | 47.81 | – |" in text
    assert "| student int8 | 190 | 49.00 | 12.0 | 90.0 | 400 | 120 / 300 |" in text
    assert "| teacher int4 | 140 | 33.10 | – |" in text and "| student int4 | 120 | 55.20 | – |" in text


def test_parallel_table_and_command_line(tmp_path):
    from benchmarks.parallel import compress_command

    command = compress_command(2, "smollm2-135m-instruct", 8192, 256, 8, 0.2, "cpu", tmp_path / "out")
    assert command[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    assert command[command.index("-m", 2):][:3] == ["-m", "lillama_core.cli", "compress"]
    rows = [{"suite": "parallel", "timestamp": f"2026-01-01T00:00:0{i}", "model": "smollm2-135m-instruct",
             "device": "cpu", "processes": p, "threads_per_process": t, "tokens": 8192, "wall_seconds": wall,
             "speedup": 217 / wall, "max_layer_loss_rel_diff": diff}
            for i, (p, t, wall, diff) in enumerate([(1, 1, 217, 0.0), (2, 1, 145, 1.1e-4)])]
    text = generated_markdown(rows, tmp_path)
    assert "| 1 × 1 | 8,192 | 217 | 1.00× | 0.0e+00 |" in text
    assert "| 2 × 1 | 8,192 | 145 | 1.50× | 1.1e-04 |" in text


def test_settings_reads_training_free_results_written_before_and_after_the_rename_of_distill():
    from benchmarks.report import settings

    plan = {"strategy": "uniform", "overrides": {}}
    for key in ("distill", "train"):  # results/*.jsonl before the rename say "distill"
        record = {"plan_config": plan, "distill_config": {"init": "svd", key: False}}
        assert settings(record) == "uniform, svd, no training"


def test_one_knob_ablations_set_their_field_typed_and_keep_their_labels():
    variants = ablation_variants("lr", recipe("tuned"), ["3e-4", "1e-3"], False, "m")
    assert [label for label, _, _ in variants] == ["lr=3e-4", "lr=1e-3"]
    assert [r.distill_config().lr for _, r, _ in variants] == [3e-4, 1e-3]
    heal = ablation_variants("heal", recipe("tuned"), None, True, "m")
    assert [(label, r.heal_config().tokens, r.distill_config().train) for label, r, _ in heal] == [
        ("heal=0 (no training)", 0, False), ("heal=16384 (no training)", 16384, False)]
    tokens = ablation_variants("tokens", recipe("tuned"), ["4096"], False, "m")
    assert tokens[0][0] == "tokens=4096" and tokens[0][2] == 4096
