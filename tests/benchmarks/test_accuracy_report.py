"""The accuracy section of docs/benchmarks.md, from records shaped as the accuracy suite writes them."""

from benchmarks.accuracy_report import accuracy_groups, accuracy_markdown, accuracy_table


def _record(method, reduction, piqa, boolq, seconds=10.0, **extra):
    scores = [{"task": "piqa", "docs": 40, "docs_in_split": 1838, "acc": piqa - 0.05, "acc_stderr": 0.07,
               "acc_norm": piqa, "acc_norm_stderr": 0.07, "chance": 0.5, "seconds": seconds, "picks": [0] * 40},
              {"task": "boolq", "docs": 40, "docs_in_split": 3270, "acc": boolq, "acc_stderr": 0.08, "acc_norm": None,
               "acc_norm_stderr": None, "chance": 0.5, "seconds": seconds, "picks": [1] * 40}]
    return {"suite": "accuracy", "timestamp": f"2026-11-30T16:00:0{len(method)}", "model": "smollm2-135m-instruct",
            "device": "cpu", "limit": 40, "task_data": "offline", "tasks": ["piqa", "boolq"], "method": method,
            "target_reduction": reduction, "ppl": 30.0 + 10 * reduction, "zero_shot": scores, **extra}


RECORDS = [_record("teacher", 0.0, 0.70, 0.55), _record("whitened", 0.2, 0.60, 0.60),
           _record("ours", 0.2, 0.68, 0.40, seconds=8.0),
           {"suite": "accuracy", "timestamp": "2026-11-30T17:00:00", "model": "smollm2-135m-instruct", "device": "cpu",
            "limit": 40, "task_data": "offline", "tasks": ["piqa", "boolq"], "method": "teacher", "check": "agreement",
            "per_task": {"piqa": {"docs": 40, "same": 40, "ours_acc": 0.65, "direct_acc": 0.65}}, "docs": 40,
            "same": 40}]


def test_table_counts_only_tasks_where_the_teacher_is_clearly_above_chance():
    group, = accuracy_groups(RECORDS)
    table = accuracy_table(group)
    assert table[0] == "| task (metric) | docs | chance | teacher | whitened 20% | ours 20% |"
    assert table[2] == "| piqa (acc_norm) | 40 | 50.0 | 70.0 | 60.0 | 68.0 |"
    # boolq's teacher (55% ± 8% against 50%) is not clearly above chance: the mean is piqa's alone
    assert table[4].startswith(
        "| **mean, teacher clearly above chance** (1 tasks) | | | **70.0** | **60.0** | **68.0**")
    assert table[5] == "| share of the teacher's mean | | | 100.0 | 85.7 | 97.1 |"
    assert table[6] == "| share of its margin over chance | | | 100.0 | 50.0 | 90.0 |"


def test_markdown_has_the_chart_time_per_task_and_agreement(tmp_path):
    text = "\n".join(accuracy_markdown(RECORDS, tmp_path))
    assert "![zero-shot accuracy per task and method](benchmarks_accuracy.svg)" in text
    svg = (tmp_path / "benchmarks_accuracy.svg").read_text()
    assert svg.count("<rect x=") >= 6 and "ours 20%: 68.0" in svg
    assert "| piqa | 40 | 10 (0.2) | 10 (0.2) |" in text  # teacher and the first student's seconds per task
    assert "| **all** | 40 | **40** (100.0%) | | |" in text


def test_students_calibrated_on_several_budgets_get_a_column_each():
    records = [RECORDS[0], _record("ours", 0.2, 0.60, 0.40, tokens=16384),
               {**_record("ours", 0.2, 0.66, 0.40, tokens=102400), "timestamp": "2026-11-30T18:00:00"}]
    group, = accuracy_groups(records)
    table = accuracy_table(group)
    assert table[0] == "| task (metric) | docs | chance | teacher | ours 20% (16k tok) | ours 20% (100k tok) |"
    assert table[2] == "| piqa (acc_norm) | 40 | 50.0 | 70.0 | 60.0 | 66.0 |"


def test_students_on_teacher_written_calibration_get_their_own_column():
    records = [RECORDS[0], _record("ours", 0.2, 0.60, 0.40, tokens=102400),
               {**_record("ours", 0.2, 0.64, 0.40, tokens=102400), "calibration": {"generated": 0.5},
                "timestamp": "2026-12-01T02:00:00"}]
    group, = accuracy_groups(records)
    table = accuracy_table(group)
    assert table[0] == "| task (metric) | docs | chance | teacher | ours 20% | ours 20% (50% teacher-written) |"
    assert table[2] == "| piqa (acc_norm) | 40 | 50.0 | 70.0 | 60.0 | 64.0 |"
