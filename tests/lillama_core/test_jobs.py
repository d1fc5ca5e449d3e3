import json
import shutil
import threading
from pathlib import Path

import pytest
from tiny import SAMPLE_TEXT

from lillama_core.config import RunConfig
from lillama_core.errors import CalibrationError, JobBusyError, LillamaError
from lillama_core.events import LayerFinished, Phase
from lillama_core.export import load_compressed, rank_map_of
from lillama_core.jobs import JobManager, compression_work, list_runs, read_run, resume_work, sweep_work, write_status


@pytest.fixture
def manager(tmp_path):
    return JobManager(tmp_path / "runs")


@pytest.fixture
def tiny_config(tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text(SAMPLE_TEXT * 20)
    config = RunConfig()
    config.model.name, config.model.device = "tiny", "cpu"
    config.calibration.source, config.calibration.tokens, config.calibration.seq_len = str(text), 512, 32
    config.calibration.batch_size = 4
    config.eval.text, config.eval.tokens, config.eval.seq_len = str(text), 256, 32
    config.plan.strategy, config.plan.reduction = "bottom", 0.1
    return config


def test_compression_job_writes_a_complete_run_folder(manager, tiny, tiny_config):
    job = manager.submit("compression", tiny_config, compression_work(tiny_config, loaded=tiny))
    assert job.wait(120) and job.status == "completed", job.message
    files = {p.name for p in job.run_dir.iterdir()}
    assert {"config.json", "events.jsonl", "metrics.json", "plan.json", "status.json", "student"} <= files
    metrics = json.loads((job.run_dir / "metrics.json").read_text())
    assert metrics["params_after"] < metrics["params_before"] and metrics["student_ppl"] > 1
    record = read_run(job.run_dir)
    assert record.status == "completed" and record.has_student and record.config == tiny_config
    assert [e.kind for e in record.events()] == [e.kind for e in job.events]
    model, _ = load_compressed(job.run_dir / "student")
    assert model is not None


def test_second_job_on_the_same_device_is_refused(manager, tiny_config):
    release = threading.Event()
    first = manager.submit("compression", tiny_config, lambda job: release.wait(30))
    with pytest.raises(JobBusyError, match="already running on cpu"):
        manager.submit("compression", tiny_config, lambda job: None)
    release.set()
    assert first.wait(30) and first.status == "completed"
    second = manager.submit("compression", tiny_config, lambda job: None)
    assert second.wait(30) and second.status == "completed"


def _student_layers(run_dir) -> set[str]:
    return {name.split(".")[2] for name in rank_map_of(load_compressed(run_dir / "student")[0])}


def test_a_stopped_run_resumes_in_its_folder_and_replaces_its_student(manager, tiny, tiny_config):
    tiny_config.plan.strategy, tiny_config.plan.reduction = "uniform", 0.2
    compress = compression_work(tiny_config, loaded=tiny)

    def stop_after_the_first_layer(job):
        record = job.record

        def record_and_stop(event):
            record(event)
            if isinstance(event, LayerFinished):
                job.stop()

        job.record = record_and_stop
        return compress(job)

    job = manager.submit("compression", tiny_config, stop_after_the_first_layer)
    assert job.wait(120) and job.status == "stopped", job.message
    assert _student_layers(job.run_dir) == {"0"}
    assert "student_ppl" not in json.loads((job.run_dir / "metrics.json").read_text())  # stop means stop now

    config, work = resume_work(job.run_dir, loaded=tiny)
    resumed = manager.submit("compression", config, work, run_dir=job.run_dir)
    assert resumed.wait(120) and resumed.status == "completed", resumed.message
    assert _student_layers(job.run_dir) == {"0", "1", "2"}


def test_out_of_memory_outside_the_layer_loop_fails_the_job_with_advice(manager, tiny, tiny_config, monkeypatch):
    import torch

    import lillama_core.pipeline as pipeline

    def planning_runs_out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(pipeline, "make_plan", planning_runs_out_of_memory)
    job = manager.submit("compression", tiny_config, compression_work(tiny_config, loaded=tiny))
    assert job.wait(60) and job.status == "failed"
    assert job.message.startswith("out of memory on the accelerator: lower the batch size")
    monkeypatch.undo()
    again = manager.submit("compression", tiny_config, compression_work(tiny_config, loaded=tiny))
    assert again.wait(120) and again.status == "completed", again.message


def test_run_names_from_the_browser_cannot_leave_the_runs_folder(manager, tmp_path):
    (manager.runs_root / "run-1").mkdir()
    (tmp_path / "secret").mkdir()
    assert manager.run_folder("run-1") == manager.runs_root / "run-1"
    for name in ["../secret", "..", "", "run-1/../../secret", str(tmp_path / "secret"), "missing"]:
        with pytest.raises(LillamaError, match="no run called"):
            manager.run_folder(name)


def test_stop_during_planning_ends_the_job_before_any_distillation(manager, tiny, tiny_config, monkeypatch):
    import lillama_core.planning.sensitivity as sensitivity

    tiny_config.plan.strategy = "sensitivity"
    real_probe = sensitivity.compressed_block
    probed = []

    def probe_then_stop(block, modules, keep, decompositions):
        probed.append(keep)
        jobs_now[0].stop()  # the user presses Stop while the first layer is being probed
        return real_probe(block, modules, keep, decompositions)

    jobs_now = []
    monkeypatch.setattr(sensitivity, "compressed_block", probe_then_stop)
    compress = compression_work(tiny_config, loaded=tiny)
    job = manager.submit("compression", tiny_config, lambda j: jobs_now.append(j) or compress(j))
    assert job.wait(60) and job.status == "stopped"
    assert "while measuring layer sensitivity" in job.message
    assert len(probed) == 1  # the stop is seen before layer 0's next probe
    assert not (job.run_dir / "student").exists()


def test_stop_marks_the_job_stopped(manager, tiny_config):
    started = threading.Event()

    def work(job):
        started.set()
        job.stop_event.wait(30)
        job.record(Phase(name="stopping", detail="saw the stop"))

    job = manager.submit("compression", tiny_config, work)
    started.wait(10)
    job.stop()
    assert job.wait(30) and job.status == "stopped"
    assert job.events[-1].name == "stopping"


def test_user_errors_and_bugs_fail_the_job_without_killing_the_manager(manager, tiny_config):
    def user_error(job):
        raise CalibrationError("calibration file not found: x.txt")

    def bug(job):
        raise ZeroDivisionError("oops")

    failed = manager.submit("compression", tiny_config, user_error)
    failed.wait(30)
    assert failed.status == "failed" and failed.message == "calibration file not found: x.txt"
    assert failed.events[-1].kind == "run_error"
    crashed = manager.submit("compression", tiny_config, bug)
    crashed.wait(30)
    assert crashed.status == "failed" and "ZeroDivisionError" in crashed.message
    assert "Traceback" in (crashed.run_dir / "traceback.txt").read_text()


def test_runs_survive_a_restart_and_dead_runs_show_as_interrupted(manager, tiny_config, tmp_path):
    job = manager.submit("compression", tiny_config, lambda job: None)
    job.wait(30)
    ghost = manager.runs_root / "2020-01-01_000000_ghost_20pct"
    ghost.mkdir()
    (ghost / "status.json").write_text(json.dumps({"status": "running"}))
    (ghost / "events.jsonl").write_text('{"kind": "phase", "name": "load", "detail": "", "time": 1}\n{"kind": "st')
    records = {r.name: r for r in list_runs(manager.runs_root)}
    assert records[job.run_dir.name].status == "completed"
    assert records[ghost.name].status == "interrupted"
    assert [e.kind for e in records[ghost.name].events()] == ["phase"]  # the torn last line is skipped


def test_a_failing_evaluation_fails_the_job_in_one_line_and_keeps_the_student(manager, tiny, tiny_config,
                                                                              monkeypatch):
    from tiny import fail_in
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    tiny_config.eval.seq_len = 48  # calibration sequences are 32 tokens: only evaluation reaches the failure
    fail_in(monkeypatch, LlamaDecoderLayer, lambda module, hidden: hidden.shape[1] == 48)
    job = manager.submit("compression", tiny_config, compression_work(tiny_config, loaded=tiny))
    assert job.wait(120) and job.status == "failed"
    traceback_file = job.run_dir / "traceback.txt"
    assert job.message == ("evaluation failed in LlamaForCausalLM at layer 0: RuntimeError: boom "
                           f"(full traceback in {traceback_file})")
    assert "RuntimeError: boom" in traceback_file.read_text()
    assert json.loads((job.run_dir / "status.json").read_text())["status"] == "failed"
    assert job.events[-1].kind == "run_error"
    record = read_run(job.run_dir)
    assert record.has_student and record.metrics["params_after"] < record.metrics["params_before"]
    assert job.result is not None and job.result.run.applied.ranks  # the app can still chat with it
    model, _ = load_compressed(job.run_dir / "student")
    assert model is not None


def test_write_status_keeps_the_state_and_the_facts_read_run_reads_back(tmp_path):
    write_status(tmp_path, "running", sweep="sweep-1", message="")
    assert json.loads((tmp_path / "status.json").read_text()) == {"status": "running", "sweep": "sweep-1",
                                                                  "message": ""}
    assert read_run(tmp_path).status == "interrupted"  # nobody in this process runs it


def test_a_sweep_records_each_run_folder_status_with_the_same_writer_as_jobs(manager, tiny, tiny_config, tmp_path,
                                                                             monkeypatch):
    from lillama_core import jobs, pipeline

    written = []
    real = jobs.write_status

    def spy(run_dir, status, **facts):
        written.append((run_dir, status))
        real(run_dir, status, **facts)

    monkeypatch.setattr(jobs, "write_status", spy)
    job = manager.submit("sweep", tiny_config, sweep_work(tiny_config, [0.1], manager.runs_root, tiny), label="sweep")
    assert job.wait(120) and job.status == "completed", job.message
    (run_dir, _), = job.result
    assert json.loads((run_dir / "status.json").read_text()) == {"status": "completed", "sweep": job.id}
    assert [s for d, s in written if d == run_dir] == ["running", "completed"]
    assert [s for d, s in written if d == job.run_dir] == ["queued", "running", "completed"]

    def no_data(*args, **kwargs):
        raise CalibrationError("calibration text is empty")

    monkeypatch.setattr(pipeline, "run_pipeline", no_data)
    job = manager.submit("sweep", tiny_config, sweep_work(tiny_config, [0.2], manager.runs_root, tiny), label="sweep")
    assert job.wait(60) and job.status == "failed"
    failed = next(r for r in list_runs(manager.runs_root) if r.config and r.config.plan.reduction == 0.2
                  and r.path != job.run_dir)
    assert json.loads((failed.path / "status.json").read_text()) == {
        "status": "failed", "message": "calibration text is empty", "sweep": job.id}


def test_a_run_folder_written_before_this_round_loads_and_resumes(tmp_path):
    from tiny import tiny_llama

    from lillama_core.cli import main
    from lillama_core.events import read_events
    from lillama_core.modeling.shipped import FactoredLinear

    run = tmp_path / "run"
    shutil.copytree(Path(__file__).resolve().parents[1] / "fixtures" / "v1_run", run)
    model_dir, calibration = tmp_path / "tiny-model", tmp_path / "calib.txt"
    loaded = tiny_llama(layers=3)  # the seeded teacher the fixture was compressed from
    loaded.model.save_pretrained(model_dir)
    loaded.tokenizer.save_pretrained(model_dir)
    calibration.write_text(SAMPLE_TEXT * 20)
    config = json.loads((run / "config.json").read_text())
    assert config["distill"]["distill"] is True  # the key this round renamed
    config["model"]["name"], config["calibration"]["source"] = str(model_dir), str(calibration)
    (run / "config.json").write_text(json.dumps(config))

    record = read_run(run)
    assert record.config.distill.train is True and record.config.plan.strategy == "uniform"
    assert main(["resume", str(run), "--out", str(tmp_path / "student"), "--no-eval"]) == 0
    phases = [e.detail for e in read_events(run / "events.jsonl") if e.kind == "phase"]
    assert sum("restored from its checkpoint" in p for p in phases) == 2  # layers 0 and 1 were not retrained
    assert sorted(p.name for p in (run / "layers").glob("layer_*.json")) == [f"layer_00{i}.json" for i in range(3)]
    student, _ = load_compressed(tmp_path / "student")
    plan = json.loads((run / "layers" / "plan.json").read_text())["ranks"]
    assert {n: m.rank for n, m in student.named_modules() if isinstance(m, FactoredLinear)} == plan  # packed or not
