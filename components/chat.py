"""Panel 4: the teacher and the student answer the same prompt side by side, streamed, with the same
sampling settings and seed, and tokens/s under each answer; speech models transcribe the same clip."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import closing
from typing import TYPE_CHECKING

import gradio as gr

from .common import user_errors
from .settings import ChatFrame, ChatSettings
from .studio import Studio

if TYPE_CHECKING:  # the controller imports this module's helpers
    from .controller import Controller

NO_STUDENT = "No student yet: run a distillation in step 3, or load a finished run in step 6."


def speed_line(update) -> str:
    if update is None:
        return ""
    if update.note:  # waiting before the first token, e.g. for the decode step to compile
        return f"⏳ {update.note}"
    state = "" if update.done else " · generating…"
    return f"{update.new_tokens} tokens · {update.tokens_per_s:.1f} tokens/s{state}"


def plain_history(messages: list[dict]) -> list[dict]:
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


def chat_outputs(frames: Iterator[ChatFrame]) -> Iterator[tuple]:
    """The chat outputs (both chatbots, both speed lines, the prompt box, the Send button) for each frame:
    the prompt is cleared and Send disabled while the models answer; a blank prompt changes nothing."""
    shown = False
    for frame in frames:
        both = (frame.teacher, frame.student, frame.teacher_speed, frame.student_speed)
        if not shown:
            yield *both, "", gr.update(interactive=False)
        elif frame.done:
            yield *both, "", gr.update(interactive=True)
        else:
            yield *both, gr.skip(), gr.skip()
        shown = True
    if not shown:
        yield (gr.skip(),) * 6


def _answers() -> dict:
    """The teacher's and the student's columns: title, chat and speed line each."""
    with gr.Row():
        with gr.Column():
            teacher_title = gr.Markdown("**Teacher**")
            teacher_box = gr.Chatbot(height=420, show_label=False)
            teacher_speed = gr.Markdown(elem_classes=["speed"])
        with gr.Column():
            student_title = gr.Markdown("**Student**")
            student_box = gr.Chatbot(height=420, show_label=False)
            student_speed = gr.Markdown(elem_classes=["speed"])
    return {"teacher_title": teacher_title, "teacher_box": teacher_box, "teacher_speed": teacher_speed,
            "student_title": student_title, "student_box": student_box, "student_speed": student_speed}


def _sampling_inputs() -> list:
    """The settings both models share (sampling, compiled decoding), in ChatSettings.from_inputs' order."""
    with gr.Accordion("Sampling (shared by both models)", open=False):
        with gr.Row():
            max_new = gr.Slider(8, 1024, value=200, step=8, label="Max new tokens")
            temperature = gr.Slider(0, 2, value=0.7, step=0.05, label="Temperature (0 = greedy)")
            top_p = gr.Slider(0.05, 1, value=0.9, step=0.05, label="Top-p")
            top_k = gr.Slider(0, 200, value=50, step=1, label="Top-k (0 = off)")
            penalty = gr.Slider(1, 2, value=1.1, step=0.05, label="Repetition penalty")
            seed = gr.Number(value=0, precision=0, label="Seed")
        graphs = gr.Checkbox(value=False, label="Compiled decoding (static KV cache, CUDA graphs on a GPU)",
                             info="faster tokens/s once compiled; the first answer of each length waits for the "
                                  "compilation (tens of seconds on a GPU, minutes on a CPU), later turns reuse it")
    return [max_new, temperature, top_p, top_k, penalty, seed, graphs]


def _transcription() -> tuple[gr.Audio, gr.Button, list]:
    """The speech section: one clip, transcribed by both models."""
    with gr.Accordion("Speech models: transcribe audio with both", open=False):
        with gr.Row():
            audio = gr.Audio(sources=["upload", "microphone"], type="numpy", label="Audio clip (up to 30 s)")
            transcribe_button = gr.Button("Transcribe with teacher and student")
        with gr.Row():
            teacher_transcript = gr.Textbox(label="Teacher's transcript", interactive=False)
            student_transcript = gr.Textbox(label="Student's transcript", interactive=False)
    return audio, transcribe_button, [teacher_transcript, student_transcript]


def build(controller: Controller) -> dict:
    studio = controller.studio
    a = _answers()
    prompt = gr.Textbox(placeholder="Ask both models something…", show_label=False, lines=2)
    with gr.Row():
        send = gr.Button("Send", variant="primary")
        halt = gr.Button("Stop generating")
        clear = gr.Button("Clear")
    sampling_inputs = _sampling_inputs()
    audio, transcribe_button, transcripts = _transcription()

    def titles():
        loaded = studio.loaded
        student = studio.current_student()
        return (f"**Teacher** · {loaded.name if loaded else studio.model_config.name}",
                f"**Student** · {student.label}" if student else f"**Student** · _{NO_STUDENT}_")

    def on_respond(message, teacher_msgs, student_msgs, max_new_v, temp_v, top_p_v, top_k_v, penalty_v, seed_v,
                   graphs_v, request: gr.Request):
        settings = ChatSettings.from_inputs(max_new_v, temp_v, top_p_v, top_k_v, penalty_v, seed_v,
                                            request.session_hash, graphs_v)
        frames = controller.respond(message, teacher_msgs, student_msgs, settings)
        with closing(frames):  # gradio closes this generator when the tab goes away: stop the decoding too
            yield from chat_outputs(frames)

    boxes = [a["teacher_box"], a["student_box"]]
    outputs = [*boxes, a["teacher_speed"], a["student_speed"], prompt, send]
    for trigger, api_name in ((send.click, "chat"), (prompt.submit, "chat_submit")):
        trigger(on_respond, [prompt, *boxes, *sampling_inputs], outputs, concurrency_id="chat",
                concurrency_limit=2, api_name=api_name)

    def on_halt(request: gr.Request):
        controller.stop_chat(request.session_hash)

    @user_errors
    def on_transcribe(clip):
        return transcribe_both(studio, clip)

    transcribe_button.click(on_transcribe, audio, transcripts, concurrency_id="chat",
                            concurrency_limit=2, api_name="transcribe")
    halt.click(on_halt, None, None, queue=False, api_name="stop_chat")
    clear.click(lambda: ([], [], "", ""), None, [*boxes, a["teacher_speed"], a["student_speed"]],
                api_visibility="private")
    return {"on_show": (titles, [], [a["teacher_title"], a["student_title"]])}
