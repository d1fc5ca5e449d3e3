import pytest

from components.evaluate import check_export_name
from components.ranks import group_keep, group_picker, ranks_for_keep
from components.studio import Studio
from lillama_core.config import PlanConfig
from lillama_core.errors import ConfigError, ExportError, RankPlanError
from lillama_core.jobs import JobManager
from lillama_core.planning.ranks import ModelShape


@pytest.fixture
def studio(tmp_path, tiny):
    s = Studio(JobManager(tmp_path / "runs"), tmp_path / "exports")
    s.loaded, s.shape = tiny, ModelShape.of(tiny.model)
    s.apply_preset(PlanConfig(strategy="uniform", rank=8, reduction=None))
    return s


def test_group_sliders_map_to_ranks_and_back(studio):
    mlp = [m for m in studio.shape.modules if m.layer == 1 and m.group == "mlp"]
    studio.set_ranks(ranks_for_keep(mlp, 50))
    assert 45 <= group_keep(studio, mlp) <= 55
    studio.set_ranks(ranks_for_keep(mlp, 100))
    assert group_keep(studio, mlp) == 100 and not any(m.name in studio.plan.ranks for m in mlp)


def test_module_edits_are_validated_and_flagged(studio):
    q = "model.layers.0.self_attn.q_proj"
    plan = studio.set_ranks({q: 40})  # 64x64 saves only below 32
    assert plan.ranks[q] == 40 and any("stores more weights" in n for n in plan.notes)
    with pytest.raises(RankPlanError, match="exceeds"):
        studio.set_ranks({q: 500})
    assert studio.plan.ranks[q] == 40  # the bad edit left the plan as it was


def test_the_default_sensitivity_preset_measures_on_calibration_data(studio, tmp_path):
    from tiny import SAMPLE_TEXT

    text = tmp_path / "calib.txt"
    text.write_text(SAMPLE_TEXT * 20)
    studio.calibration.source, studio.calibration.tokens, studio.calibration.seq_len = str(text), 512, 32
    assert PlanConfig().strategy == "sensitivity"
    plan = studio.apply_preset(PlanConfig(reduction=0.1))
    assert plan.strategy == "sensitivity" and plan.ranks and studio.summary().reduction >= 0.1


def test_plan_json_for_another_model_is_refused(studio):
    with pytest.raises(RankPlanError, match="does not have"):
        studio.load_plan_json('{"ranks": {"model.layers.99.mlp.up_proj": 4}}')
    with pytest.raises(RankPlanError, match="not valid plan JSON"):
        studio.load_plan_json("{oops")


def test_remote_code_needs_the_server_flag(studio):
    with pytest.raises(ConfigError, match="remote code is disabled"):
        studio.load("someone/model", trust_remote_code=True)


@pytest.mark.parametrize("name", ["../escape", "a/b", "/abs", "", "..", "x" * 200, "a\\b"])
def test_export_names_cannot_escape_the_exports_folder(name):
    with pytest.raises(ExportError):
        check_export_name(name)


def test_good_export_name():
    assert check_export_name(" smollm2-20pct.v1 ") == "smollm2-20pct.v1"


def test_typed_paths_outside_the_allowed_folders_are_refused(tmp_path):
    from components.model_data import SOURCE_KINDS, calibration_from_inputs

    data, secret = tmp_path / "data", tmp_path / "private"
    data.mkdir(), secret.mkdir()
    (data / "corpus.txt").write_text("fine")
    (secret / "notes.txt").write_text("not for visitors")
    (data / "link.txt").symlink_to(secret / "notes.txt")
    studio = Studio(JobManager(tmp_path / "runs"), tmp_path / "exports", path_roots=[data])
    assert studio.confine(str(data / "corpus.txt")) == str(data / "corpus.txt")
    assert studio.confine("HuggingFaceTB/SmolLM2-360M") == "HuggingFaceTB/SmolLM2-360M"  # a hub id, not a path
    for typed in (str(secret / "notes.txt"), str(data / "link.txt"), str(data / ".." / "private"), "/etc/passwd"):
        with pytest.raises(ConfigError, match="must be inside"):
            studio.confine(typed)
    with pytest.raises(ConfigError, match="must be inside"):
        calibration_from_inputs(studio, SOURCE_KINDS[1], str(secret / "notes.txt"), "", "", "train", 4096, 256, 8, 0.0)
    with pytest.raises(ConfigError, match="must be inside"):
        studio.load(str(secret))
    open_studio = Studio(JobManager(tmp_path / "runs"), tmp_path / "exports")  # on this machine only: anywhere
    assert open_studio.confine(str(secret / "notes.txt")) == str(secret / "notes.txt")


def test_the_group_picker_offers_what_the_model_has(studio):
    picker = group_picker(studio)
    assert picker["choices"] == [("attention (12)", "attention"), ("mlp (9)", "mlp")]  # 3 layers of a tiny Llama
    assert picker["value"] == ["attention", "mlp"]  # the default also names experts and ssm, absent here


def test_a_speech_model_plans_runs_evaluates_and_exports_through_the_studio(tmp_path):
    from tiny import tiny_whisper

    from components.evaluate import measure, table
    from components.model_data import calibration_preview
    from lillama_core.config import CalibrationConfig, ModelConfig
    from lillama_core.export import export_student, load_feature_extractor
    from lillama_core.tasks.speech import reference_transcripts

    whisper = tiny_whisper()
    s = Studio(JobManager(tmp_path / "runs"), tmp_path / "exports", model=ModelConfig(name="tiny-whisper",
                                                                                      device="cpu"))
    s.loaded, s.shape = whisper, ModelShape.of(whisper.model)
    s.calibration = CalibrationConfig(source="default", tokens=24 * 16, seq_len=16, batch_size=4)
    preview = calibration_preview(s, whisper, s.calibration)
    assert "24 audio clips" in preview and "not to keep the student" in preview
    plan = s.apply_preset(PlanConfig(strategy="sensitivity", reduction=0.1))  # measured on audio calibration
    assert any(".encoder." in n for n in plan.ranks) or any(".decoder." in n for n in plan.ranks)
    job = s.start_distillation()
    assert job.wait(120) and job.status == "completed", job.message
    metrics = job.result.metrics
    assert metrics.student_wer >= 0 and metrics.student_ppl > 0 and metrics.teacher_wer == 0
    student = s.current_student()
    assert student.feature_extractor is whisper.feature_extractor

    reference = reference_transcripts(whisper.model, whisper.tokenizer, whisper.feature_extractor, s.calibration)
    rows = [measure(whisper.model, whisper.tokenizer, whisper.task, reference, "teacher", 4),
            measure(student.model, student.tokenizer, whisper.task, reference, "student", 4)]
    shown = table(rows)
    assert list(shown["word error rate vs teacher transcripts"])[0] == "0.0%" and "transcribe tok/s" in shown.columns
    assert rows[1]["parameters"] < rows[0]["parameters"]
    folder = export_student(student.model, student.tokenizer, tmp_path / "export",
                            feature_extractor=student.feature_extractor)
    assert load_feature_extractor(folder) is not None


def test_layer_titles_name_the_stack_only_when_there_are_several(studio):
    from tiny import tiny_whisper

    from components.ranks import layer_titles

    assert layer_titles(studio.shape) == {i: f"layer {i}" for i in range(studio.shape.num_layers)}
    whisper = ModelShape.of(tiny_whisper().model)
    assert layer_titles(whisper) == {0: "layer 0 · encoder 0", 1: "layer 1 · encoder 1", 2: "layer 2 · decoder 0",
                                     3: "layer 3 · decoder 1"}


def test_exports_from_the_app_record_the_runs_config_metrics_and_plan(studio, tiny, tmp_path):
    import json

    from components.studio import Student
    from lillama_core.export import export_student, read_record
    from lillama_core.jobs import write_json

    run_dir = tmp_path / "runs" / "a-run"
    run_dir.mkdir(parents=True)
    studio.run_config().save(run_dir / "config.json")
    write_json(run_dir / "metrics.json", {"teacher_ppl": 36.9, "student_ppl": 40.5})
    write_json(run_dir / "plan.json", json.loads(studio.plan.to_json()))
    record = studio.export_record(Student(tiny.model, tiny.tokenizer, "a-run", run_dir))
    folder = export_student(tiny.model, tiny.tokenizer, tmp_path / "export", record=record)
    saved = read_record(folder)
    assert saved["config"] == studio.run_config().to_dict() and saved["plan"]["ranks"] == studio.plan.ranks
    assert saved["metrics"]["student_ppl"] == 40.5 and "| 36.90 | 40.50 |" in (folder / "README.md").read_text()


def test_a_provisional_plan_shows_at_once_and_the_measured_one_replaces_it(measuring_studio, monkeypatch):
    import threading

    import lillama_core.planning.sensitivity as sensitivity
    from components.ranks import planning_note

    release, notes, calls = threading.Event(), [], []
    real = sensitivity.measure_sensitivity

    def measure(*args, **kwargs):
        calls.append(1)
        release.wait(30)  # hold the measurement until the provisional state has been checked
        damage = real(*args, **kwargs)
        notes.append(planning_note(studio))  # the note as it reads after the last layer's Phase event
        return damage

    monkeypatch.setattr(sensitivity, "measure_sensitivity", measure)
    studio = measuring_studio()
    thread = studio.start_planning()
    assert studio.plan.strategy == "uniform" and studio.plan.ranks and studio.measuring()
    assert "Provisional uniform plan" in planning_note(studio)
    with pytest.raises(RankPlanError, match="still being measured"):
        studio.start_distillation()
    release.set()
    thread.join(60)
    assert "measuring sensitivity: layer 3/3" in notes[0]
    assert studio.plan.strategy == "sensitivity" and studio.plan_generation == 1 and planning_note(studio) == ""

    # A relaunch on the same model and data: the stored measurement is used, not measured again.
    again = measuring_studio()
    again.start_planning().join(60)
    assert len(calls) == 1 and again.plan.ranks == studio.plan.ranks


def test_a_preset_chosen_while_measuring_wins(measuring_studio):
    studio = measuring_studio()
    thread = studio.start_planning()
    chosen = studio.apply_preset(PlanConfig(strategy="uniform", rank=8, reduction=None))
    thread.join(60)
    assert studio.plan is chosen and studio.provisional is None and not studio.measuring()


@pytest.mark.parametrize("remote", [True, False])
def test_a_student_opens_with_remote_code_exactly_when_its_teacher_did(studio, tmp_path, monkeypatch, remote):
    import components.studio as module

    opened = {}

    def load_compressed(folder, device, trust_remote_code=False):
        opened["trust_remote_code"] = trust_remote_code
        return studio.loaded.model, studio.loaded.tokenizer

    monkeypatch.setattr(module, "load_compressed", load_compressed)
    monkeypatch.setattr(module, "load_feature_extractor", lambda folder: None)
    studio.model_config.trust_remote_code = remote
    studio.load_student(tmp_path / "runs" / "run-1")
    assert opened["trust_remote_code"] is remote
