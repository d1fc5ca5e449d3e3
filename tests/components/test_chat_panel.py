from types import SimpleNamespace

import gradio as gr

from components import chat
from components.studio import Studio
from lillama_core.chat import GenerationUpdate
from lillama_core.jobs import JobManager
from lillama_core.planning.ranks import ModelShape


def test_closing_the_tab_mid_answer_stops_the_decoding(tmp_path, tiny, monkeypatch):
    studio = Studio(JobManager(tmp_path / "runs"), tmp_path / "exports")
    studio.loaded, studio.shape = tiny, ModelShape.of(tiny.model)
    seen_stops = []

    def endless_answer(model, tokenizer, message, sampling, history, stop):
        seen_stops.append(stop)
        n = 0
        while not stop.is_set():
            n += 1
            yield GenerationUpdate("tok " * n, n, 100.0, False)
            stop.wait(0.01)

    monkeypatch.setattr(chat, "stream_chat", endless_answer)
    with gr.Blocks() as demo:
        chat.build(studio)
    respond = next(f.fn for f in demo.fns.values() if f.api_name == "chat")
    answer = respond("hello", [], [], 32, 0.7, 0.9, 40, 1.1, 0, SimpleNamespace(session_hash="tab-1"))
    next(answer)
    next(answer)
    assert seen_stops and not seen_stops[0].is_set()
    answer.close()  # what gradio does when the browser goes away
    assert seen_stops[0].is_set()


def test_speech_models_transcribe_one_clip_with_teacher_and_student(tmp_path, tiny):
    import numpy as np
    import pytest
    from tiny import tiny_whisper

    from components.studio import Student
    from lillama_core.tasks.speech import synthetic_clips, to_mono, transcribe

    studio = Studio(JobManager(tmp_path / "runs"), tmp_path / "exports")
    studio.loaded, studio.shape = tiny, ModelShape.of(tiny.model)
    with pytest.raises(gr.Error, match="speech model"):
        chat.transcribe_both(studio, (16000, np.zeros(1600, dtype=np.int16)))

    whisper = tiny_whisper()
    studio.loaded, studio.shape = whisper, ModelShape.of(whisper.model)
    clip = synthetic_clips(1, seed=3)[0]
    pcm = (clip * 32767).astype(np.int16)[::2]  # as a browser sends it: integer PCM, here at 8 kHz
    teacher, student = chat.transcribe_both(studio, (8000, pcm))
    assert student == chat.NO_STUDENT
    audio = to_mono(pcm, 8000)
    assert audio.size == 2 * pcm.size and np.abs(audio[::2] - clip[::2]).max() < 1e-3  # mono float at 16 kHz
    expected = transcribe(whisper.model, whisper.tokenizer, whisper.feature_extractor, audio)
    assert teacher.startswith(expected["text"]) and "tokens/s" in teacher
    studio.student = Student(whisper.model, whisper.tokenizer, "same weights", None, whisper.feature_extractor)
    studio.jobs.latest = lambda: None
    teacher, student = chat.transcribe_both(studio, (8000, pcm))
    assert student.split("\n")[0] == teacher.split("\n")[0]
