import gradio as gr
import pytest
import torch

from components.common import user_errors
from lillama_core.errors import CalibrationError


def test_user_errors_become_one_clear_message_and_bugs_stay_bugs():
    @user_errors
    def panel(exc):
        raise exc

    with pytest.raises(gr.Error) as oom:
        panel(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"))
    assert oom.value.message == "out of memory: lower the token budget, sequence length or batch size"
    with pytest.raises(gr.Error) as missing:
        panel(CalibrationError("calibration file not found: x.txt"))
    assert missing.value.message == "calibration file not found: x.txt"
    with pytest.raises(KeyError):  # a programming error is not dressed up as the user's fault
        panel(KeyError("bug"))


def test_streaming_panels_get_the_same_treatment():
    @user_errors
    def stream():
        yield "first"
        raise torch.OutOfMemoryError("CUDA out of memory")

    gen = stream()
    assert next(gen) == "first"
    with pytest.raises(gr.Error, match="out of memory"):
        next(gen)


def test_a_job_seen_running_that_fails_is_toasted_once_with_its_one_line(monkeypatch):
    from types import SimpleNamespace

    from components.common import announce_failure

    toasts = []
    monkeypatch.setattr(gr, "Warning", toasts.append)
    job = SimpleNamespace(id="compression-1", status="failed",
                          message="distillation failed in LlamaForCausalLM at layer 2: RuntimeError: boom")
    announce_failure(job, ("compression-1", 40, "running"))  # this tab watched it run
    announce_failure(job, ("compression-1", 41, "failed"))  # the next poll: already told
    announce_failure(job, ("", -1))  # a page opened after the failure shows it in the panel, not as a toast
    assert toasts == [job.message]


def test_a_failing_forward_in_a_panel_keeps_its_traceback(monkeypatch, tmp_path):
    from lillama_core.runtime.failures import stage

    monkeypatch.setenv("LILLAMA_HOME", str(tmp_path))

    @user_errors
    def panel():
        with stage("evaluation", model=torch.nn.Linear(2, 2)):
            raise IndexError("index out of range in self")

    with pytest.raises(gr.Error) as toast:
        panel()
    (saved,) = tmp_path.glob("errors/*/traceback.txt")
    assert toast.value.message == ("evaluation failed in Linear outside its layers: IndexError: index out of range "
                                   f"in self (full traceback in {saved})")
