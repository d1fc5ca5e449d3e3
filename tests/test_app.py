"""The launched app, driven through its API with gradio_client, on the real SmolLM2."""

import json
import time
from pathlib import Path

import pytest
import torch
from app_server import running_app

from lillama_core.export import load_compressed
from lillama_core.modeling.shipped import FactoredLinear

pytestmark = pytest.mark.real_model

CALIBRATION = ("Built-in", "", "", "", "train", 2048, 128, 8, 0.0)


@pytest.fixture(scope="module")
def app(tmp_path_factory, smollm):
    tmp = tmp_path_factory.mktemp("app")
    with running_app(tmp, "--no-preload") as url:
        from gradio_client import Client

        yield Client(url, verbose=False), tmp


def wait_for(client, predicate, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = client.predict(api_name="/status")
        if predicate(status):
            return status
        time.sleep(1)
    raise TimeoutError(f"last status: {status}")


@pytest.fixture(scope="module")
def distilled(app):
    """The app's one real path, step by step: load the built-in model, preview the calibration set, apply a preset
    and distil it. The tests below each take one step further from here, so none of them runs for minutes."""
    client, tmp = app
    card = client.predict("smollm2-135m-instruct", "", False, False, api_name="/load_model")
    assert "LlamaForCausalLM" in card and "134,515,008" in card
    preview = client.predict(*CALIBRATION, api_name="/calibration")
    assert "16 sequences × 128 tokens = 2,048 tokens" in preview
    totals, _ = client.predict("bottom", 2, 30, 0, ["attention", "mlp"], 16, api_name="/apply_preset")
    assert "reduction" in totals and "2." in totals
    client.predict("whitened", 3e-4, 1, "joint", 0, api_name="/start")
    status = wait_for(client, lambda s: s["status"] not in ("running", "queued"))
    return client, tmp, status


def test_a_distillation_started_in_the_app_completes_with_a_student(distilled):
    _, _, status = distilled
    assert status["status"] == "completed", status
    assert status["student"] and "fewer" in status["student"]


def test_chat_streams_teacher_and_student_with_their_speeds(distilled):
    client, _, _ = distilled
    job = client.submit("Name a fruit.", [], [], 24, 0, 0.9, 50, 1.1, 0, False, api_name="/chat")
    outputs = list(job)
    teacher_msgs, student_msgs, teacher_speed, student_speed = job.result()[:4]
    assert len(outputs) > 2  # streamed: several partial updates before the final one
    assert teacher_msgs[-1]["content"] and student_msgs[-1]["content"]
    assert "tokens/s" in teacher_speed and "tokens/s" in student_speed


def test_evaluate_compares_teacher_and_student(distilled):
    client, _, _ = distilled
    table, _ = client.predict("default", 512, 128, False, False, "synthetic", api_name="/evaluate")
    rows = {row[0]: row for row in table["data"]}
    assert set(rows) == {"teacher", "student"}
    headers = table["headers"]
    assert float(rows["student"][headers.index("perplexity")]) > 1
    assert rows["student"][headers.index("parameters")] != rows["teacher"][headers.index("parameters")]


def test_exports_reload_the_standard_way_and_integer_weights_are_smaller(distilled):
    client, tmp, _ = distilled
    note, _ = client.predict("e2e-student", "compressed (low-rank, smallest)", False, "float", api_name="/export")
    folder = tmp / "exports" / "e2e-student"
    assert str(folder) in note
    model, tokenizer = load_compressed(folder)
    ranks = [m.rank for m in model.modules() if isinstance(m, FactoredLinear)]
    assert ranks and all(rank % 16 == 0 for rank in ranks)  # the preset's rank multiple reached the export
    note, _ = client.predict("e2e-int4", "compressed (low-rank, smallest)", False, "int4", api_name="/export")
    int4 = tmp / "exports" / "e2e-int4"
    size = lambda f: (f / "model.safetensors").stat().st_size  # noqa: E731
    assert str(int4) in note and "trust_remote_code=True" in note and size(int4) < size(folder) / 2
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


def _events(run_dir, kind):
    out = []
    for line in (Path(run_dir) / "events.jsonl").read_text().splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:  # the line being written right now
            continue
        if event["kind"] == kind:
            out.append(event)
    return out


def _wait_until(predicate, timeout=300):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.5)


def test_second_start_is_refused_many_tabs_follow_stop_keeps_layers_and_resume_continues(app):
    from gradio_client import Client

    client, _ = app
    client.predict("Built-in", "", "", "", "train", 8192, 128, 4, 0.0, api_name="/calibration")
    client.predict("uniform", 20, 30, 0, ["attention", "mlp"], api_name="/apply_preset")
    client.predict("whitened", 3e-4, 1, "joint", 0, api_name="/start")
    first = wait_for(client, lambda s: s["status"] == "running" and s["events"] > 5)
    with pytest.raises(Exception, match="already running"):
        client.predict("whitened", 3e-4, 1, "joint", 0, api_name="/start")

    # Brand-new clients are new browser tabs: each re-attaches to the same job and sees it advance,
    # and a chat answered meanwhile neither waits for the run nor stops it.
    tabs = [Client(client.src, verbose=False) for _ in range(3)]
    seen = [tab.predict(api_name="/status") for tab in tabs]
    assert {s["id"] for s in seen} == {first["id"]}
    answer = tabs[0].submit("Name a fruit.", [], [], 8, 0, 0.9, 50, 1.1, 0, False, api_name="/chat")
    teacher_msgs = answer.result(timeout=180)[0]
    assert teacher_msgs[-1]["content"]
    _wait_until(lambda: all(tab.predict(api_name="/status")["events"] > s["events"]
                            for tab, s in zip(tabs, seen, strict=True)))
    assert client.predict(api_name="/status")["status"] == "running"

    run_dir = first["run_dir"]
    _wait_until(lambda: _events(run_dir, "layer_finished"))
    tabs[1].predict(api_name="/stop")
    stopped = wait_for(client, lambda s: s["status"] != "running", timeout=60)
    assert stopped["status"] == "stopped"
    kept = len(_events(run_dir, "layer_finished"))

    # Explore's "Resume it" continues in the same folder, restoring the finished layers instead of retraining them.
    client.predict(api_name="/runs")  # the Explore list, as a click on its Refresh button fills it
    note = client.predict(Path(run_dir).name, api_name="/resume")
    assert "Resuming" in note
    resumed = wait_for(client, lambda s: s["id"] != first["id"] and s["status"] == "running")
    assert resumed["run_dir"] == run_dir
    _wait_until(lambda: len([e for e in _events(run_dir, "phase") if "restored from its checkpoint" in e["detail"]])
                == kept)
    client.predict(api_name="/stop")
    assert wait_for(client, lambda s: s["status"] != "running", timeout=60)["status"] == "stopped"


@pytest.fixture
def launches(monkeypatch):
    """The keyword arguments of every `launch` app.main makes, with the app itself never built or served."""
    import app as studio_app

    calls = []

    class FakeDemo:
        def queue(self, **kwargs):
            return self

        def launch(self, **kwargs):
            calls.append(kwargs)

    monkeypatch.setattr(studio_app, "build_app", lambda studio, uploads: FakeDemo())
    return calls


def test_binds_to_this_machine_unless_told_and_sharing_warns(tmp_path, launches, capsys):
    import app as studio_app

    base = ["--no-preload", "--runs-dir", str(tmp_path / "runs"), "--exports-dir", str(tmp_path / "exports")]
    studio_app.main(base)
    assert launches[-1]["server_name"] == "127.0.0.1" and launches[-1]["share"] is False
    assert "WARNING" not in capsys.readouterr().err
    assert launches[-1]["auth"] is None
    studio_app.main(base + ["--share", "--host", "0.0.0.0"])
    assert launches[-1]["server_name"] == "0.0.0.0" and launches[-1]["share"] is True
    err = capsys.readouterr().err
    assert "WARNING: this app is published on a public gradio.live URL (--share) WITHOUT A PASSWORD" in err
    assert "typed paths are limited to" in err
    studio_app.main(base + ["--host", "0.0.0.0"])
    assert "published to other machines (--host 0.0.0.0) WITHOUT A PASSWORD" in capsys.readouterr().err


def test_auth_asks_visitors_to_log_in_and_silences_the_warning(tmp_path, launches, capsys):
    import app as studio_app

    logins = tmp_path / "logins"
    logins.write_text("# the team\nbob:s3cret:with:colons\n\ncarol:pw\n")
    base = ["--no-preload", "--runs-dir", str(tmp_path / "runs"), "--exports-dir", str(tmp_path / "exports"),
            "--share", "--host", "0.0.0.0"]
    studio_app.main(base + ["--auth", "alice:pa:ss", "--auth-file", str(logins)])
    assert launches[-1]["auth"] == [("alice", "pa:ss"), ("bob", "s3cret:with:colons"), ("carol", "pw")]
    assert "WARNING" not in capsys.readouterr().err

    for flags, message in ((["--auth", "alice"], "expected USER:PASS"), (["--auth", ":pw"], "expected USER:PASS"),
                           (["--auth-file", str(tmp_path / "missing")], "cannot read"),
                           (["--auth-file", str(tmp_path / "runs")], "cannot read")):
        with pytest.raises(SystemExit) as exit_info:
            studio_app.main(base + flags)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and "Traceback" not in err
    logins.write_text("bob:ok\nno-colon-here\n")
    with pytest.raises(SystemExit):
        studio_app.main(base + ["--auth-file", str(logins)])
    err = capsys.readouterr().err
    assert "line 2: expected user:pass" in err and "no-colon-here" not in err
    assert len(launches) == 1  # none of the malformed logins reached launch


def test_typed_paths_are_confined_only_when_others_can_reach_the_app(tmp_path):
    import app as studio_app

    uploads = tmp_path / "uploads"
    local = studio_app.parse_args(["--exports-dir", str(tmp_path / "exports")])
    assert studio_app.path_roots(local, uploads) is None
    for flags in (["--share"], ["--host", "0.0.0.0"]):
        shared = studio_app.parse_args(flags + ["--exports-dir", str(tmp_path / "e"), "--data-dir", str(tmp_path)])
        assert studio_app.path_roots(shared, uploads) == [uploads, tmp_path / "e", tmp_path]


def test_uploads_over_the_size_limit_are_refused(tmp_path):
    import httpx

    with running_app(tmp_path, "--no-preload", "--max-upload", "2kb") as url:
        small = httpx.post(url + "gradio_api/upload", files={"files": ("c.txt", b"x" * 1000)}, timeout=30)
        large = httpx.post(url + "gradio_api/upload", files={"files": ("c.txt", b"x" * 5000)}, timeout=30)
    assert small.status_code == 200
    assert large.status_code == 413 and "maximum allowed size" in large.text


def test_every_public_api_endpoint_has_a_chosen_name(tmp_path, tiny):
    # Gradio names an unnamed listener after its function ("lambda_3", "on_save_1"): such names are not an API
    # anyone chose, and they change whenever a handler is renamed or another is added.
    import re

    import app as studio_app
    from components.studio import Studio
    from lillama_core.jobs import JobManager
    from lillama_core.planning.ranks import ModelShape

    studio = Studio(JobManager(tmp_path / "runs"), tmp_path / "exports")
    studio.loaded, studio.shape = tiny, ModelShape.of(tiny.model)
    demo = studio_app.build_app(studio, tmp_path / "uploads")
    public = [fn.api_name for fn in demo.fns.values() if fn.api_visibility == "public"]
    assert {"load_model", "start", "stop", "chat", "export", "evaluate", "accuracy"} <= set(public)
    derived = [name for name in public if re.fullmatch(r"lambda|on_\w+|\w+_\d+", name)]
    assert not derived, f"public endpoints named after their functions: {derived}"
