import pytest

from benchmarks.profile import projected_seconds
from benchmarks.profile_report import profile_section
from lillama_core.config import DistillConfig


def _layer(**phases):
    return {"breakdown": phases}


def test_projection_scales_per_token_phases_and_keeps_the_factorisation():
    layer = _layer(teacher_targets=1.0, train_steps=4.0, advance=1.0, factorisation=2.0, held_out=0.5)
    # 8192 tokens of 256: 32 sequences, 2 held out, 4 steps of 8 -> 2 checks (first, last) of 2 sequences.
    same = projected_seconds([layer], 8192, 8192, 256, 8, DistillConfig(eval_every=16))
    assert same == pytest.approx(8.5)
    # 16x the tokens: 512 sequences, 32 held out, 60 steps -> 5 checks (first, 16, 32, 48, last) of 32.
    bigger = projected_seconds([layer], 16 * 8192, 8192, 256, 8, DistillConfig(eval_every=16))
    assert bigger == pytest.approx(6.0 * 16 + 2.0 + 0.5 * (5 * 32) / (2 * 2))
    # The automatic cadence at 1M tokens: 3906 sequences, 32 held out, 485 steps -> every 29: 1 + 17 checks.
    automatic = projected_seconds([layer], 1_000_000, 8192, 256, 8, DistillConfig())
    assert automatic == pytest.approx(6.0 * 1_000_000 / 8192 + 2.0 + 0.5 * (18 * 32) / (2 * 2))


def _record(tag, factorisation, steps):
    phases = {"teacher_targets": 1.0, "factorisation": factorisation, "train_steps": steps}
    total = sum(phases.values())
    return {"suite": "profile", "tag": tag, "model": "m", "target_reduction": 0.2, "method": "tuned",
            "device": "cpu", "dtype": "float32", "env": {"torch_threads": 2}, "tokens": 8192, "layers_profiled": 1,
            "plan_layers": 28, "phase_seconds": phases, "layer_seconds": total,
            "outside_training_share": 1 - steps / total, "step_tokens_per_s_median": 100.0,
            "layer_tokens_per_s_median": 50.0, "mfu_median": 0.01, "step_mfu_median": 0.1, "peak_fp32_flops": 4e10,
            "projected_distill_seconds": {"1000000": 3600.0, "13000000": 36000.0}, "flops_formula": "f",
            "peak_method": "p"}


def test_profile_section_shows_each_tag_as_the_median_of_its_runs():
    records = [_record("before", 10.0, 2.0), _record("before", 30.0, 2.0), _record("before", 50.0, 2.0),
               _record("after", 2.0, 2.0)]
    lines = profile_section(records)
    assert "| seconds per layer | before | after |" in lines
    assert "| factorisation | 30.00 | 2.00 |" in lines
    assert "| **layer total** | 33.0 | 5.0 |" in lines
    assert profile_section([{"suite": "quality"}]) == []
