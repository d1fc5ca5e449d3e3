from types import SimpleNamespace

import gradio as gr

from components import chat
from components.studio import Studio
from lillama_core.chat import GenerationUpdate
from lillama_core.jobs import JobManager
from lillama_core.ranks import ModelShape


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
