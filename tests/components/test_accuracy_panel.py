"""The Evaluate step's zero-shot accuracy section and the Explore step's accuracy axis, on a tiny Llama."""

import json

import pytest
from tiny import tiny_llama

from components.charts import accuracy_chart, accuracy_tradeoff_chart
from components.controller import Controller
from components.explore import run_rows
from components.settings import AccuracySettings
from components.studio import Student
from lillama_core.errors import ConfigError
from lillama_core.jobs import write_json


def _accuracy_handler(studio):
    """The Evaluate step's zero-shot handler, as the panel calls it."""

    def score(tasks, limit, prompts, every_run, progress):
        return Controller(studio).accuracy(AccuracySettings(tuple(tasks), limit, prompts, every_run), progress)

    return score


def test_teacher_vs_student_table_chart_progress_and_run_record(studio, tmp_path):
    run_dir = tmp_path / "runs" / "run-1"
    run_dir.mkdir(parents=True)
    write_json(run_dir / "metrics.json", {"student_ppl": 50.0, "params_after": 80_000, "reduction": 0.2})
    (run_dir / "config.json").write_text(studio.run_config().to_json())
    other = tiny_llama(layers=3, seed=1)
    studio.student = Student(other.model, other.tokenizer, "a student", run_dir)
    progress = []
    note, table, chart, generation = _accuracy_handler(studio)(
        ["winogrande", "piqa"], 3, 1, True, progress=lambda share, desc=None: progress.append((share, desc)))
    assert list(table["task"]) == ["winogrande", "piqa"]
    assert {"teacher", "student", "retention", "above chance", "same answer", "chance"} <= set(table.columns)
    assert table.loc[0, "chance"] == "50.0%"
    assert "retention" in note or "not clearly above chance" in note
    figure = json.loads(chart.plot)
    assert [t["name"] for t in figure["data"]] == ["teacher", "student", "chance"]
    shares = [share for share, _ in progress]
    assert shares[-1] == 1.0 and any("student: piqa" in (desc or "") for _, desc in progress)
    assert generation["visible"] and list(generation["value"]["model"]) == ["teacher", "student"]

    kept = json.loads((run_dir / "metrics.json").read_text())
    assert kept["student_ppl"] == 50.0  # earlier metrics stay
    assert [r["task"] for r in kept["zero_shot"]["tasks"]] == ["winogrande", "piqa"]
    assert studio.eval.tasks == ["winogrande", "piqa"] and studio.eval.limit == 3  # later runs score them too
    row = next(r for r in run_rows(studio) if r["name"] == "run-1")
    assert row["student_accuracy"] == kept["student_accuracy"]


def test_teacher_alone_and_user_errors(studio):
    handler = _accuracy_handler(studio)
    note, table, _, generation = handler(["lambada_openai"], 2, 0, False, progress=lambda *a, **k: None)
    assert "Teacher alone" in note and list(table.columns) == ["task", "metric", "docs", "chance", "teacher"]
    assert not generation["visible"] and studio.eval.tasks == []
    with pytest.raises(ConfigError, match="no tasks"):
        handler([], 2, 0, False, progress=lambda *a, **k: None)


def test_accuracy_pareto_front_prefers_smaller_and_more_accurate():
    runs = [{"name": "a", "params_after": 100, "student_accuracy": 0.50, "teacher_accuracy": 0.6},
            {"name": "b", "params_after": 80, "student_accuracy": 0.55},
            {"name": "c", "params_after": 60, "student_accuracy": 0.40},
            {"name": "d", "params_after": 90, "student_accuracy": None}]
    figure = accuracy_tradeoff_chart(runs)
    points, front = figure["data"]
    assert points["text"] == ["a", "b", "c"]
    assert front["x"] == [60, 80] and front["y"] == pytest.approx([40.0, 55.0])  # "a": bigger and worse than "b"
    assert figure["layout"]["shapes"][0]["y0"] == 60.0


def test_accuracy_chart_uses_each_tasks_headline_metric():
    teacher = [{"task": "piqa", "acc": 0.6, "acc_stderr": 0.05, "acc_norm": 0.7, "acc_norm_stderr": 0.04,
                "chance": 0.5},
               {"task": "boolq", "acc": 0.55, "acc_stderr": 0.05, "acc_norm": None, "acc_norm_stderr": None,
                "chance": 0.5}]
    bars, chance = accuracy_chart({"teacher": teacher})["data"]
    assert bars["y"] == pytest.approx([70.0, 55.0]) and chance["y"] == pytest.approx([50.0, 50.0])
    assert bars["error_y"]["array"] == pytest.approx([4.0, 5.0])
