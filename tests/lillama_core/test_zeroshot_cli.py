"""`lillama compress --tasks` and `lillama eval --tasks/--generation` on a tiny random Llama."""

import json

from tiny import SAMPLE_TEXT

from lillama_core.cli import main
from lillama_core.config import RunConfig
from lillama_core.export import read_record


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_compress_then_eval_scores_teacher_and_student_side_by_side(tiny_model_dir, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text(SAMPLE_TEXT * 20)
    out = tmp_path / "student"
    assert main(["compress", "--model", str(tiny_model_dir), "--calibration", str(text), "--tokens", "256",
                 "--seq-len", "32", "--batch-size", "4", "--eval-text", str(text), "--eval-tokens", "128",
                 "--eval-seq-len", "32", "--reduction", "0.1", "--strategy", "bottom", "--out", str(out),
                 "--runs-dir", str(tmp_path / "runs"), "--tasks", "winogrande,piqa", "--limit", "3", "--json"]) == 0
    summary = _last_json(capsys)
    zero_shot = summary["zero_shot"]
    assert [r["task"] for r in zero_shot["tasks"]] == ["winogrande", "piqa"]
    assert all(s["docs"] == 3 for s in zero_shot["teacher"] + zero_shot["student"])
    record = read_record(out)
    assert record["metrics"]["zero_shot"]["tasks"] == zero_shot["tasks"]  # the run record keeps it
    assert RunConfig.from_dict(record["config"]).eval.tasks == ["winogrande", "piqa"]

    # the export names its teacher: eval scores both on the same documents, and their greedy answers
    assert main(["eval", "--model", str(out), "--eval-text", str(text), "--eval-tokens", "64", "--eval-seq-len",
                 "32", "--no-speed", "--tasks", "piqa", "--limit", "3", "--generation", "2", "--max-new-tokens",
                 "6"]) == 0
    shown = capsys.readouterr().out
    assert "retention" in shown and "same answer" in shown and "distinct-2" in shown
    assert main(["eval", "--model", str(out), "--eval-text", str(text), "--eval-tokens", "64", "--eval-seq-len",
                 "32", "--no-speed", "--tasks", "piqa", "--limit", "3", "--json"]) == 0
    again = _last_json(capsys)["zero_shot"]
    assert again["teacher"][0]["acc_norm"] == zero_shot["teacher"][1]["acc_norm"]  # same teacher, same docs
    assert again["student"][0]["acc_norm"] == zero_shot["student"][1]["acc_norm"]


def test_eval_of_a_plain_model_scores_it_alone(tiny_model_dir, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text(SAMPLE_TEXT * 4)
    assert main(["eval", "--model", str(tiny_model_dir), "--eval-text", str(text), "--eval-tokens", "64",
                 "--eval-seq-len", "32", "--no-speed", "--tasks", "lambada_openai", "--limit", "2", "--generation",
                 "1", "--max-new-tokens", "4", "--json"]) == 0
    summary = _last_json(capsys)
    assert [s["task"] for s in summary["zero_shot"]["model"]] == ["lambada_openai"]
    assert "tasks" not in summary["zero_shot"] and list(summary["generation"]) == ["model"]
    assert summary["generation"]["model"]["prompts"] == 1


def test_unknown_tasks_fail_in_one_line_before_loading(capsys):
    assert main(["eval", "--model", "/no/such/model", "--tasks", "zero-shot,mmlu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [err[-1]] and err[-1].startswith("lillama: error: no offline data for mmlu")
    assert main(["compress", "--tasks", "nope", "--out", "x"]) == 2
    assert "no offline data for nope" in capsys.readouterr().err
