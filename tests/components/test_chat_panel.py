import gradio as gr
import pytest

from components import chat, controller
from components.controller import Controller
from components.settings import ChatFrame, ChatSettings
from components.studio import Student
from lillama_core.chat import GenerationUpdate, SamplingConfig
from lillama_core.planning.ranks import ModelShape


def endless_answers(monkeypatch):
    """stream_chat replaced by an answer that grows until its stop is set; returns the stops it was given."""
    seen_stops = []

    def endless_answer(model, tokenizer, message, sampling, history, stop, graphs):
        seen_stops.append(stop)
        n = 0
        while not stop.is_set():
            n += 1
            yield GenerationUpdate("tok " * n, n, 100.0, False)
            stop.wait(0.01)

    monkeypatch.setattr(controller, "stream_chat", endless_answer)
    return seen_stops


def test_chat_settings_come_from_the_sliders_as_gradio_sends_them():
    settings = ChatSettings.from_inputs(24.0, 0, 0.9, 50.0, 1.1, None, "tab-1")
    assert settings == ChatSettings(SamplingConfig(24, 0.0, 0.9, 50, 1.1, 0), "tab-1", graphs=False)
    assert ChatSettings.from_inputs(24.0, 0, 0.9, 50.0, 1.1, None, "tab-1", True).graphs is True


def test_both_models_answer_streamed_with_the_same_settings(studio, monkeypatch):
    seen = []

    def answer(model, tokenizer, message, sampling, history, stop, graphs):
        seen.append((model, sampling, history))
        yield GenerationUpdate("a", 1, 10.0, False)
        yield GenerationUpdate("a pear", 2, 20.0, True)

    monkeypatch.setattr(controller, "stream_chat", answer)
    studio.student = Student(studio.loaded.model, studio.loaded.tokenizer, "same weights")
    studio.jobs.latest = lambda: None
    settings = ChatSettings(SamplingConfig(max_new_tokens=8, seed=3), "tab-1")
    before = [{"role": "user", "content": "hi", "metadata": None}, {"role": "assistant", "content": "hello"}]
    stream = Controller(studio).respond("Name a fruit.", before, [], settings)
    first = next(stream)  # frames share the growing conversations, as gradio sends each one when it is yielded
    assert not first.done and first.teacher[-1] == {"role": "assistant", "content": ""}
    assert first.teacher[-2] == {"role": "user", "content": "Name a fruit."} and len(first.teacher) == 4
    last = list(stream)[-1]
    assert last.done and last.teacher[-1]["content"] == last.student[-1]["content"] == "a pear"
    assert last.teacher_speed == last.student_speed == "2 tokens · 20.0 tokens/s"
    assert all(sampling == settings.sampling for _, sampling, _ in seen)
    # each side continues its own conversation, without the chatbot's extra keys
    assert sorted((h for _, _, h in seen), key=len) == [[], [{"role": "user", "content": "hi"},
                                                            {"role": "assistant", "content": "hello"}]]


def test_without_a_student_the_teacher_answers_alone(studio, monkeypatch):
    monkeypatch.setattr(controller, "stream_chat", lambda *args: iter([GenerationUpdate("ok", 1, 5.0, True)]))
    last = list(Controller(studio).respond("hi", [], [], ChatSettings(SamplingConfig())))[-1]
    assert last.teacher[-1]["content"] == "ok" and last.student[-1]["content"] == chat.NO_STUDENT
    assert last.student_speed == ""


def test_a_blank_prompt_changes_nothing(studio):
    assert list(Controller(studio).respond("  ", [], [], ChatSettings(SamplingConfig()))) == []
    assert list(chat.chat_outputs(iter([]))) == [(gr.skip(),) * 6]


def test_stop_ends_only_that_sessions_answer(studio, monkeypatch):
    seen_stops = endless_answers(monkeypatch)
    ctl = Controller(studio)
    answers = {tab: ctl.respond("hello", [], [], ChatSettings(SamplingConfig(), tab)) for tab in ("tab-1", "tab-2")}
    for answer in answers.values():
        next(answer), next(answer)
    ctl.stop_chat("tab-1")
    ctl.stop_chat("a tab that asked nothing")
    assert seen_stops[0].is_set() and not seen_stops[1].is_set()
    assert list(answers["tab-1"])[-1].done  # the stopped answer ends with its final frame
    answers["tab-2"].close()
    assert seen_stops[1].is_set()


def test_closing_the_tab_mid_answer_stops_the_decoding(studio, monkeypatch):
    seen_stops = endless_answers(monkeypatch)
    outputs = chat.chat_outputs(Controller(studio).respond("hello", [], [], ChatSettings(SamplingConfig(), "tab-1")))
    first = next(outputs)
    assert first[4] == "" and first[5]["interactive"] is False  # prompt cleared, Send disabled while answering
    assert next(outputs)[4:] == (gr.skip(), gr.skip())
    assert seen_stops and not seen_stops[0].is_set()
    # what gradio does when the browser goes away: the adapter closes the controller's stream with it
    with gr.Blocks() as demo:
        chat.build(Controller(studio))
    on_respond = next(f.fn for f in demo.fns.values() if f.api_name == "chat")
    answer = on_respond("hello", [], [], 32, 0.7, 0.9, 40, 1.1, 0, False,
                        type("Request", (), {"session_hash": "tab-9"}))
    next(answer), next(answer)
    answer.close()
    assert seen_stops[-1].is_set()


def test_the_last_frame_enables_send_again():
    frames = [ChatFrame([], [], "", ""), ChatFrame([], [], "1 tokens", "", done=True)]
    shown = list(chat.chat_outputs(iter(frames)))
    assert shown[-1][2] == "1 tokens" and shown[-1][4] == "" and shown[-1][5]["interactive"] is True


def test_speech_models_transcribe_one_clip_with_teacher_and_student(studio):
    import numpy as np
    from tiny import tiny_whisper

    from lillama_core.tasks.speech import synthetic_clips, to_mono, transcribe

    with pytest.raises(gr.Error, match="speech model"):
        chat.transcribe_both(studio, (16000, np.zeros(1600, dtype=np.int16)))

    whisper = tiny_whisper()
    studio.loaded, studio.shape = whisper, ModelShape.of(whisper.model)
    with pytest.raises(gr.Error, match="speech model"):  # and it does not chat
        next(Controller(studio).respond("hi", [], [], ChatSettings(SamplingConfig())))
    clip = synthetic_clips(1, seed=3)[0]
    pcm = (clip * 32767).astype(np.int16)[::2]  # as a browser sends it: integer PCM, here at 8 kHz
    teacher, student = chat.transcribe_both(studio, (8000, pcm))
    assert student == chat.NO_STUDENT
    audio = to_mono(pcm, 8000)
    # mono float at 16 kHz; a band-limited resampler passes close to the 8 kHz samples it was given
    assert audio.dtype == np.float32 and audio.size == 2 * pcm.size
    assert np.corrcoef(audio[::2], pcm / 32767)[0, 1] > 0.999
    expected = transcribe(whisper.model, whisper.tokenizer, whisper.feature_extractor, audio)
    assert teacher.startswith(expected["text"]) and "tokens/s" in teacher
    studio.student = Student(whisper.model, whisper.tokenizer, "same weights", None, whisper.feature_extractor)
    studio.jobs.latest = lambda: None
    teacher, student = chat.transcribe_both(studio, (8000, pcm))
    assert student.split("\n")[0] == teacher.split("\n")[0]


def test_one_session_asking_again_replaces_its_stop(studio, monkeypatch):
    seen_stops = endless_answers(monkeypatch)
    ctl = Controller(studio)
    first = ctl.respond("one", [], [], ChatSettings(SamplingConfig(), "tab-1"))
    next(first), next(first)
    second = ctl.respond("two", [], [], ChatSettings(SamplingConfig(), "tab-1"))
    next(second), next(second)
    first.close()  # the old answer ending must not forget the new one's stop
    ctl.stop_chat("tab-1")
    assert seen_stops[1].is_set()
    second.close()


def test_compiled_decoding_is_an_option_whose_warm_up_shows_once_and_whose_compile_serves_later_turns(studio,
                                                                                                     monkeypatch):
    from transformers import CompileConfig

    from lillama_core.runtime import graphs

    with gr.Blocks() as demo:
        chat.build(Controller(studio))
    inputs = next(f for f in demo.fns.values() if f.api_name == "chat").inputs
    (option,) = [c for c in inputs if isinstance(c, gr.Checkbox)]
    assert "CUDA graphs" in option.label and option.value is False
    # traced by dynamo, run eagerly: what the option does, in seconds rather than inductor's minutes
    monkeypatch.setattr(graphs, "compile_config", lambda device: CompileConfig(backend="eager", mode="default"))
    ctl = Controller(studio)
    settings = ChatSettings(SamplingConfig(max_new_tokens=6, temperature=0), "tab-1", graphs=True)
    first = list(ctl.respond("hello", [], [], settings))
    waiting = f"⏳ {graphs.WARM_UP_NOTE}"
    assert any(f.teacher_speed == waiting for f in first) and "tokens/s" in first[-1].teacher_speed
    decoder = ctl._graphs["teacher"]
    second = list(ctl.respond("again", first[-1].teacher, [], settings))
    assert not any(f.teacher_speed == waiting for f in second) and second[-1].teacher[-1]["content"]
    assert ctl._graphs["teacher"] is decoder and decoder.model is studio.loaded.model
    plain = list(ctl.respond("hello", [], [], ChatSettings(SamplingConfig(max_new_tokens=6, temperature=0), "tab-1")))
    assert plain[-1].teacher[-1]["content"] == first[-1].teacher[-1]["content"]  # the same greedy answer
