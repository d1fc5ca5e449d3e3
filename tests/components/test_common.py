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
