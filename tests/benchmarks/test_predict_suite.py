"""The prediction check's record selection and its report: pure functions of benchmark records."""

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.bench import Budget  # noqa: E402
from benchmarks.predict import comparable  # noqa: E402
from benchmarks.predict_report import check, predict_section  # noqa: E402

DISTILLED = {"init": "whitened", "lr": 1e-3, "loss": "joint", "schedule": "cosine", "train": True}


def _run(ranks, ppl, suite="quality", distill=DISTILLED, **extra):
    return {"suite": suite, "model": "m", "device": "cpu", "tokens": 16384, "eval": {"tokens": 8192},
            "ranks": ranks, "ppl": ppl, "distill_config": distill, **extra}


def test_only_comparable_runs_count_and_a_plan_measured_twice_counts_once():
    records = [_run({"a": 8}, 50.0), _run({"a": 8}, 51.0, suite="ablation"),  # the same plan again
               _run({"a": 16}, 40.0), _run({"a": 4}, 90.0, distill={"init": "whitened", "train": False}),
               _run({"a": 4}, 90.0, distill={**DISTILLED, "lr": 3e-4}),  # another recipe
               _run({"a": 4}, 90.0, tokens=4096), _run({"a": 4}, 90.0, device="cuda:0"),
               _run({"a": 4}, 90.0, heal_config={"tokens": 16384}), _run({"a": 4}, 90.0, suite="speed")]
    picked = comparable(records, "m", Budget(), "cpu")
    assert [(group, r["ppl"]) for group, r in picked] == [("distilled", 50.0), ("distilled", 40.0),
                                                          ("training-free", 90.0)]


def _predict_record(damage, ppl, group="distilled"):
    return {"suite": "predict", "timestamp": "2026-01-01T00:00:00", "sweep": "s", "group": group, "model": "m",
            "device": "cpu", "env": {"cpu": "a CPU"}, "eval": {"tokens": 8192}, "strategy": "uniform",
            "target_reduction": 0.2, "reduction": 0.2, "overrides": {}, "predicted_damage": damage, "ppl": ppl,
            "teacher_ppl": 30.0, "ladder_seconds": 5.0, "ladder_calibration": {"tokens": 16384,
                                                                              "measured_tokens": 2048}}


def test_perplexities_following_the_damage_rank_perfectly_and_the_report_says_so():
    runs = [_predict_record(d, 30.0 * math.exp(0.4 * d**0.8)) for d in (0.1, 0.3, 0.6, 1.0, 1.5)]
    result = check(runs)
    assert result["spearman"] == pytest.approx(1.0) and result["max_error"] < 1e-9
    text = "\n".join(predict_section(runs))
    assert "Spearman 1.000 (target met)" in text and text.count("| uniform 20% |") == 5


def test_a_plan_out_of_order_lowers_the_rank_correlation():
    runs = [_predict_record(d, p) for d, p in ((0.1, 35.0), (0.3, 60.0), (0.6, 45.0), (1.0, 80.0))]
    assert check(runs)["damage_spearman"] < 1.0 and "not met" in "\n".join(predict_section(runs))
