import shlex
from dataclasses import replace

import gradio as gr
import pytest
from tiny import SAMPLE_TEXT

from components import chat, distill, evaluate, explore, model_data, ranks
from components.controller import Controller
from components.settings import EvalSettings, PresetSettings
from components.studio import Student, Studio
from lillama_core.cli import main
from lillama_core.config import PlanConfig, RunConfig
from lillama_core.errors import ConfigError
from lillama_core.jobs import JobManager
from lillama_core.planning.ranks import RankPlan


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


def test_the_panels_keep_their_api_names(studio, tmp_path):
    with gr.Blocks() as demo:
        ctl = Controller(studio)
        model_data.build(studio, tmp_path), ranks.build(ctl), distill.build(ctl), chat.build(ctl)
        evaluate.build(ctl), explore.build(ctl)
    assert {"load_model", "calibration", "apply_preset", "start", "chat", "chat_submit", "transcribe", "evaluate",
            "export", "save_recipe", "load_recipe", "cli_command", "load_run_recipe", "runs", "resume"} <= {
        f.api_name for f in demo.fns.values()}


def test_every_step_shows_a_loaded_recipe_when_next_opened_and_keeps_typed_values_otherwise(studio, tmp_path):
    with gr.Blocks():
        ctl = Controller(studio)
        shows = {"model": model_data.build(studio, tmp_path)["on_show"][0], "distill": distill.build(ctl)["on_show"][0],
                 "evaluate": evaluate.build(ctl)["on_show"][0]}
    seen = studio.recipe_version
    skipped = [gr.skip()] * 14
    assert list(shows["model"](seen)) == [*skipped, seen] and list(shows["evaluate"](seen)) == [*skipped[:4], seen]
    recipe = tmp_path / "recipe.yaml"
    RunConfig.from_yaml("model:\n  name: my/hub-model\ncalibration:\n  source: wikitext\n  tokens: 4096\n"
                        "  generated: 0.25\ndistill:\n  lr: 0.02\n  epochs: 3\nheal:\n  tokens: 2048\n"
                        "eval:\n  seq_len: 96\n").save(recipe)
    ctl.load_recipe(recipe)
    model = shows["model"](seen)
    assert model[0] == model_data.OTHER and model[1]["value"] == "my/hub-model" and model[1]["visible"]
    assert model[4:6] == ("Hugging Face dataset", "wikitext") and model[9] == 4096 and model[12] == 0.25
    assert model[-1] == seen + 1
    assert shows["distill"]()[1:] == ("whitened", 0.02, 3, "joint", 2048)
    assert shows["evaluate"](seen)[2] == 96 and list(shows["model"](seen + 1)) == [*skipped, seen + 1]


def _set_a_recipe(studio):
    """Settings that differ from the defaults in every section, as the forms would leave them."""
    studio.model_config = replace(studio.model_config, device="cpu", dtype="float32")
    studio.calibration = replace(studio.calibration, tokens=2048, seq_len=64, text_field="content")
    studio.plan_config = PlanConfig(strategy="uniform", reduction=None, rank=8, groups=["mlp"], rank_multiple=1)
    studio.distill = replace(studio.distill, lr=3e-4, init="svd", train=False)
    studio.heal = replace(studio.heal, tokens=4096)
    studio.eval = replace(studio.eval, tokens=1024, seq_len=64)
    studio.seed = 3
    return studio.run_config()


def test_a_saved_yaml_recipe_loads_back_and_its_cli_command_runs(studio, tmp_path, capsys):
    expected = _set_a_recipe(studio)
    (recipe,) = Controller(studio).save_recipe(tmp_path)
    assert recipe.name == "recipe.yaml" and RunConfig.load(recipe) == expected
    fresh = Studio(JobManager(tmp_path / "runs"), tmp_path / "exports")
    assert fresh.run_config() != expected
    fresh_ctl = Controller(fresh)
    assert "recipe loaded" in fresh_ctl.load_recipe(recipe)
    assert fresh.run_config() == expected and fresh.plan is None  # the plan is made again from its settings
    shown = fresh_ctl.cli_command()
    command = shlex.split(shown.splitlines()[-1])
    assert command[:2] == ["lillama", "compress"] and "--rank" in command and "--plan" not in shown
    assert main([*command[1:], "--print-config"]) == 0
    assert RunConfig.from_yaml(capsys.readouterr().out) == expected


def test_a_hand_edited_plan_is_saved_beside_the_recipe_and_named_by_the_command(studio, tmp_path):
    ctl = Controller(studio)
    ctl.apply_preset(PresetSettings("uniform", 20, 50, 8, ("attention", "mlp"), 8))
    assert ctl.save_recipe(tmp_path) == [tmp_path / "recipe.yaml"] and "--plan" not in ctl.cli_command()
    name = next(iter(studio.plan.ranks))
    studio.set_ranks({name: 4})
    recipe, plan = ctl.save_recipe(tmp_path)
    assert plan == tmp_path / "plan.json" and RankPlan.load(plan).ranks == studio.plan.ranks
    assert RankPlan.load(plan).ranks[name] == 4
    assert "--plan plan.json --out OUT_FOLDER" in ctl.cli_command() and "plan.json:" in ctl.cli_command()
    ctl.apply_preset(PresetSettings("uniform", 20, 50, 8, ("attention", "mlp"), 8))
    assert "--plan" not in ctl.cli_command()
    studio.load_plan_json(plan.read_text())  # a plan from a file is not the preset's either
    assert "--plan plan.json" in ctl.cli_command() and RankPlan.load(ctl.save_recipe(tmp_path)[1]).ranks[name] == 4


@pytest.mark.parametrize("text, message", [
    ("distill:\n  learning_rate: 0.1\n", "learning_rate"),
    ("plan:\n  reduction: 2\n", "between 0 and 1"),
    ("model: [unclosed\n", "not valid YAML"),
    ("model:\n  trust_remote_code: true\n", "remote code"),
])
def test_an_invalid_recipe_is_one_error_and_changes_nothing(studio, tmp_path, text, message):
    before = studio.run_config()
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    with pytest.raises(ConfigError, match=message):
        Controller(studio).load_recipe(recipe)
    assert studio.run_config() == before and studio.loaded is not None


def test_a_recipe_for_another_model_unloads_the_teacher_and_one_for_the_same_keeps_it(studio, tmp_path):
    ctl = Controller(studio)
    same = tmp_path / "same.yaml"
    replace(studio.run_config(), distill=replace(studio.distill, lr=0.01)).save(same)
    assert "loads when" not in ctl.load_recipe(same) and studio.loaded is not None and studio.distill.lr == 0.01
    other = tmp_path / "other.json"
    RunConfig(model=replace(studio.model_config, name="gemma3-270m")).save(other)
    assert "loads when a step needs it" in ctl.load_recipe(other)
    assert studio.loaded is None and studio.model_config.name == "gemma3-270m"


def test_explore_loads_the_recipe_of_a_run_folder(studio, tmp_path):
    config = _set_a_recipe(studio)
    studio.apply_recipe(RunConfig())
    job = studio.jobs.submit("compression", config, lambda job: None)  # a run folder as the app makes them
    assert job.wait(30) and job.status == "completed"
    ctl = Controller(studio)
    ctl.load_run_recipe(job.run_dir.name)
    assert studio.run_config() == config
    with pytest.raises(ConfigError, match="no run called"):
        ctl.load_run_recipe("../elsewhere")
    with pytest.raises(ConfigError, match="pick a run"):
        ctl.load_run_recipe("")
