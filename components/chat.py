"""Panel 4: the teacher and the student answer the same prompt side by side, streamed, with the same
sampling settings and seed, and tokens/s under each answer; speech models transcribe the same clip."""

from __future__ import annotations

import queue
import threading

import gradio as gr

from lillama_core.chat import SamplingConfig, stream_chat

from .common import friendly, user_errors
from .studio import Studio

NO_STUDENT = "No student yet: run a distillation in step 3, or load a finished run in step 6."


def _speed(update) -> str:
    if update is None:
        return ""
    state = "" if update.done else " · generating…"
    return f"{update.new_tokens} tokens · {update.tokens_per_s:.1f} tokens/s{state}"


def _history(messages: list[dict]) -> list[dict]:
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def transcribe_both(studio: Studio, clip) -> tuple[str, str]:
    """Teacher's and student's transcripts of one (sampling rate, samples) clip, with decoding speed."""
    loaded = studio.ensure_loaded()
    if not loaded.task.transcribes:
        raise gr.Error("transcription needs a speech model (Whisper); this teacher is a text model: use the chat")
    if clip is None:
        raise gr.Error("record or upload an audio clip first")
    rate, samples = clip
    shown = []
    student = studio.current_student()
    for model in (loaded.model, student.model if student else None):
        if model is None:
            shown.append(NO_STUDENT)
            continue
        result = loaded.task.transcribe(loaded, model, samples, rate)
        shown.append(f"{result['text']}\n\n({result['tokens']} tokens · {result['tokens_per_s']:.1f} tokens/s)")
    return shown[0], shown[1]


def build(studio: Studio) -> dict:
    with gr.Row():
        with gr.Column():
            teacher_title = gr.Markdown("**Teacher**")
            teacher_box = gr.Chatbot(height=420, show_label=False)
            teacher_speed = gr.Markdown(elem_classes=["speed"])
        with gr.Column():
            student_title = gr.Markdown("**Student**")
            student_box = gr.Chatbot(height=420, show_label=False)
            student_speed = gr.Markdown(elem_classes=["speed"])
    prompt = gr.Textbox(placeholder="Ask both models something…", show_label=False, lines=2)
    with gr.Row():
        send = gr.Button("Send", variant="primary")
        halt = gr.Button("Stop generating")
        clear = gr.Button("Clear")
    with gr.Accordion("Sampling (shared by both models)", open=False):
        with gr.Row():
            max_new = gr.Slider(8, 1024, value=200, step=8, label="Max new tokens")
            temperature = gr.Slider(0, 2, value=0.7, step=0.05, label="Temperature (0 = greedy)")
            top_p = gr.Slider(0.05, 1, value=0.9, step=0.05, label="Top-p")
            top_k = gr.Slider(0, 200, value=50, step=1, label="Top-k (0 = off)")
            penalty = gr.Slider(1, 2, value=1.1, step=0.05, label="Repetition penalty")
            seed = gr.Number(value=0, precision=0, label="Seed")
    with gr.Accordion("Speech models: transcribe audio with both", open=False):
        with gr.Row():
            audio = gr.Audio(sources=["upload", "microphone"], type="numpy", label="Audio clip (up to 30 s)")
            transcribe_button = gr.Button("Transcribe with teacher and student")
        with gr.Row():
            teacher_transcript = gr.Textbox(label="Teacher's transcript", interactive=False)
            student_transcript = gr.Textbox(label="Student's transcript", interactive=False)
    stops: dict[str, threading.Event] = {}  # per browser session, so Stop ends only that tab's answer

    def titles():
        loaded = studio.loaded
        student = studio.current_student()
        return (f"**Teacher** · {loaded.name if loaded else studio.model_config.name}",
                f"**Student** · {student.label}" if student else f"**Student** · _{NO_STUDENT}_")

    def respond(message, teacher_msgs, student_msgs, max_new_v, temp_v, top_p_v, top_k_v, penalty_v, seed_v,
                request: gr.Request):
        if not (message or "").strip():
            yield gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
            return
        try:
            loaded = studio.ensure_loaded()
        except Exception as exc:
            raise gr.Error(friendly(exc)) from None
        if not loaded.task.chats:
            raise gr.Error("this is a speech model: it transcribes audio rather than chats. Use 'transcribe audio "
                           "with both' below, or step 5 (perplexity and word error rate on held-out clips)")
        student = studio.current_student()
        sampling = SamplingConfig(int(max_new_v), float(temp_v), float(top_p_v), int(top_k_v), float(penalty_v),
                                  int(seed_v or 0))
        stop = stops[request.session_hash] = threading.Event()
        updates: queue.Queue = queue.Queue()
        sides = {"teacher": (loaded.model, loaded.tokenizer, _history(teacher_msgs))}
        if student:
            sides["student"] = (student.model, student.tokenizer, _history(student_msgs))

        def produce(side, model, tokenizer, history):
            try:
                for update in stream_chat(model, tokenizer, message, sampling, history, stop):
                    updates.put((side, update, None))
            except Exception as exc:  # shown in that model's pane; the other keeps going
                updates.put((side, None, friendly(exc)))
            updates.put((side, None, "done"))

        threads = [threading.Thread(target=produce, args=(side, *args), daemon=True) for side, args in sides.items()]
        for t in threads:
            t.start()
        try:
            teacher_msgs = teacher_msgs + [{"role": "user", "content": message},
                                           {"role": "assistant", "content": ""}]
            student_msgs = student_msgs + [{"role": "user", "content": message},
                                           {"role": "assistant", "content": "" if student else NO_STUDENT}]
            latest = {"teacher": None, "student": None}
            running = len(threads)
            yield teacher_msgs, student_msgs, "", "", "", gr.update(interactive=False)
            while running:
                side, update, note = updates.get()
                msgs = teacher_msgs if side == "teacher" else student_msgs
                if note == "done":
                    running -= 1
                elif note:
                    msgs[-1]["content"] = f"⚠ {note}"
                else:
                    latest[side] = update
                    msgs[-1]["content"] = update.text
                if updates.empty():  # coalesce bursts so the browser gets one update per batch of tokens
                    yield (teacher_msgs, student_msgs, _speed(latest["teacher"]), _speed(latest["student"]),
                           gr.skip(), gr.skip())
            yield (teacher_msgs, student_msgs, _speed(latest["teacher"]), _speed(latest["student"]), "",
                   gr.update(interactive=True))
        finally:
            # also when the browser goes away mid-answer and gradio closes this generator: no orphan decoding
            stop.set()
            if stops.get(request.session_hash) is stop:
                stops.pop(request.session_hash)

    sampling_inputs = [max_new, temperature, top_p, top_k, penalty, seed]
    outputs = [teacher_box, student_box, teacher_speed, student_speed, prompt, send]
    for trigger, api_name in ((send.click, "chat"), (prompt.submit, "chat_submit")):
        trigger(respond, [prompt, teacher_box, student_box, *sampling_inputs], outputs, concurrency_id="chat",
                concurrency_limit=2, api_name=api_name)

    def on_halt(request: gr.Request):
        stop = stops.get(request.session_hash)
        if stop is not None:
            stop.set()

    @user_errors
    def on_transcribe(clip):
        return transcribe_both(studio, clip)

    transcribe_button.click(on_transcribe, audio, [teacher_transcript, student_transcript], concurrency_id="chat",
                            concurrency_limit=2, api_name="transcribe")
    halt.click(on_halt, None, None, queue=False)
    clear.click(lambda: ([], [], "", ""), None, [teacher_box, student_box, teacher_speed, student_speed])
    return {"on_show": (titles, [], [teacher_title, student_title])}
