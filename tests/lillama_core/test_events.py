import json

import pytest

from lillama_core.events import (
    EVENT_CLASSES,
    Phase,
    RunFinished,
    RunStatus,
    Step,
    StepStage,
    event_from_dict,
    read_events,
)


@pytest.mark.parametrize("cls", list(EVENT_CLASSES.values()))
def test_events_take_keywords_only(cls):
    with pytest.raises(TypeError):
        cls("positional")


def test_status_and_stage_are_plain_strings_in_the_log_and_compare_as_strings(tmp_path):
    finished = RunFinished(status=RunStatus.STOPPED, layers_done=[0], seconds=1.0, tokens=10)
    assert json.loads(finished.to_json())["status"] == "stopped" and finished.status == "stopped"
    log = tmp_path / "events.jsonl"
    log.write_text(finished.to_json() + "\n" + Phase(name="load").to_json() + "\n")
    assert read_events(log) == [finished, Phase(name="load", time=read_events(log)[1].time)]


def test_a_step_log_line_from_before_the_stage_field_loads():
    old = {"kind": "step", "time": 1.0, "layer": 2, "step": 1, "steps": 4, "global_step": 9, "steps_total": 16,
           "loss_teacher_input": 0.5, "loss_student_input": 0.6, "lr": 1e-3, "tokens_per_s": 10.0,
           "elapsed_s": 1.0, "eta_s": 3.0}
    assert event_from_dict(old).stage == StepStage.DISTILL
    healing = event_from_dict({**old, "layer": -1})
    assert isinstance(healing, Step) and healing.stage == StepStage.HEAL


def test_non_finite_numbers_are_written_as_strict_json_null(tmp_path):
    step = Step(layer=0, step=1, steps=4, global_step=1, steps_total=4, loss_teacher_input=float("nan"),
                loss_student_input=0.5, lr=1e-3, tokens_per_s=float("inf"), elapsed_s=0.0, eta_s=float("inf"))

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    line = json.loads(step.to_json(), parse_constant=refuse)
    assert line["loss_teacher_input"] is None and line["eta_s"] is None and line["loss_student_input"] == 0.5
    log = tmp_path / "events.jsonl"
    log.write_text(step.to_json() + "\n")
    assert read_events(log)[0].eta_s is None
