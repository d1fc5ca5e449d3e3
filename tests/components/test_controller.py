import gradio as gr
import pytest
from tiny import SAMPLE_TEXT

from components import chat, evaluate, ranks
from components.controller import Controller
from components.settings import EvalSettings, PresetSettings
from components.studio import Student, Studio
from lillama_core.errors import ConfigError
from lillama_core.jobs import JobManager
from lillama_core.planning.ranks import ModelShape


@pytest.fixture
def studio(tmp_path, tiny):
    s = Studio(JobManager(tmp_path / "runs"), tmp_path / "exports")
    s.loaded, s.shape = tiny, ModelShape.of(tiny.model)
    return s


def test_preset_settings_speak_the_panels_units():
    by_target = PresetSettings("bottom", 30, 40, 0, ("attention", "mlp"), 16).plan_config()
    assert (by_target.reduction, by_target.rank, by_target.layer_keep, by_target.rank_multiple) == (0.3, None, 0.4, 16)
    assert by_target.groups == ["attention", "mlp"]
    by_rank = PresetSettings("uniform", 30, 40, 8.0).plan_config()
    assert (by_rank.reduction, by_rank.rank) == (None, 8)


def test_apply_preset_changes_the_plan_and_the_totals(studio):
    ctl = Controller(studio)
    totals, _ = ctl.apply_preset(PresetSettings("uniform", 20, 50, 8, ("attention", "mlp"), 8))
    plan = studio.plan
    assert plan.strategy == "uniform" and set(plan.ranks.values()) == {8} and len(plan.ranks) == 21
    assert f"{studio.summary().reduction:.1%}" in totals
    totals_mlp, chart = ctl.apply_preset(PresetSettings("uniform", 20, 50, 8, ("mlp",), 8))
    assert len(studio.plan.ranks) == 9 and totals_mlp != totals and chart is not None
    with pytest.raises(ConfigError):
        ctl.apply_preset(PresetSettings("no-such-strategy", 20, 50))
    assert len(studio.plan.ranks) == 9  # a refused preset keeps the plan


def test_evaluate_returns_the_table_of_teacher_and_student(studio, tmp_path):
    text = tmp_path / "held_out.txt"
    text.write_text(SAMPLE_TEXT * 10)
    studio.student = Student(studio.loaded.model, studio.loaded.tokenizer, "same weights")
    studio.jobs.latest = lambda: None
    steps = []
    shown, chart = Controller(studio).evaluate(EvalSettings(str(text), 256, 32),
                                               lambda fraction, desc="": steps.append(desc))
    assert list(shown["model"]) == ["teacher", "student"]
    assert steps == ["preparing the held-out data", "teacher", "student"]
    assert shown["perplexity"][0] == shown["perplexity"][1]  # the same weights score the same
    assert (studio.eval.text, studio.eval.tokens, studio.eval.seq_len) == (str(text), 256, 32)
    assert list(studio.teacher_ppl.values()) == [pytest.approx(float(shown["perplexity"][0]), rel=1e-2)]
    assert chart is not None


def test_evaluate_refuses_a_path_outside_the_allowed_folders(studio, tmp_path):
    studio.path_roots = [tmp_path / "data"]
    with pytest.raises(ConfigError, match="must be inside"):
        Controller(studio).evaluate(EvalSettings(text="/etc/passwd"))


def test_the_panels_keep_their_api_names(studio):
    with gr.Blocks() as demo:
        ctl = Controller(studio)
        ranks.build(ctl), chat.build(ctl), evaluate.build(ctl)
    assert {"apply_preset", "chat", "chat_submit", "transcribe", "evaluate", "export"} <= {
        f.api_name for f in demo.fns.values()}
