"""Panel 3: start and stop a distillation and watch it live. The job runs in the background; this
panel only polls its events, so closing the tab changes nothing and reopening re-attaches."""

from __future__ import annotations

import html
from dataclasses import replace
from typing import TYPE_CHECKING

import gradio as gr

from lillama_core.config import INITS, LOSS_PATHS

from . import recipe
from .charts import duration, human, human_bytes, layer_table, loss_chart, memory_chart, run_progress, throughput_chart
from .common import announce_failure, plot, user_errors
from .studio import Studio

if TYPE_CHECKING:  # the controller imports the panels
    from .controller import Controller

POLL_SECONDS = 0.4


def progress_html(job) -> str:
    if job is None:
        return "<div class='progress-wrap'>No run yet. Set a plan in step 2, then press Start.</div>"
    p = run_progress(job.events)
    state = job.status if not job.running else p["status"]
    vram = (f"VRAM {human_bytes(p['vram_used'])} / {human_bytes(p['vram_total'])} (torch peak {human_bytes(p['peak'])})"
            if p["vram_total"] else f"CPU · peak memory {human_bytes(p['peak'])}")
    message = f"<div class='warn'>{html.escape(job.message)}</div>" if job.message else ""
    layer = p["layer"] if p["layer"] is not None else "–"
    return (f"<div class='progress-wrap'><b>{html.escape(state)}</b> · layer {layer}"
            f" ({p['position']}) · run folder <code>{html.escape(str(job.run_dir))}</code>"
            f"<div class='progress-bar'><div style='width:{100 * p['fraction']:.1f}%'></div></div>"
            f"<div class='progress-meta'><span>{100 * p['fraction']:.0f}%</span><span>ETA {duration(p['eta_s'])}</span>"
            f"<span>elapsed {duration(p['elapsed_s'])}</span><span>{human(p['tokens_per_s'])} tokens/s</span>"
            f"<span>{vram}</span></div>{message}</div>")


def form_values(studio: Studio) -> tuple:
    """The distillation forms' values from the studio: initialisation, lr, epochs, loss paths, healing tokens."""
    return studio.distill.init, studio.distill.lr, studio.distill.epochs, studio.distill.loss, studio.heal.tokens


def _settings_row(studio: Studio) -> tuple[list, gr.Button, gr.Button]:
    """The distillation forms (what form_values fills) and the Start and Stop buttons."""
    with gr.Row():
        init = gr.Dropdown(list(INITS), value=studio.distill.init, label="Initialisation")
        lr = gr.Number(value=studio.distill.lr, label="Learning rate", minimum=0)
        epochs = gr.Slider(1, 8, value=studio.distill.epochs, step=1, label="Epochs per layer")
        loss = gr.Dropdown(list(LOSS_PATHS), value=studio.distill.loss, label="Loss paths")
        heal_tokens = gr.Number(value=studio.heal.tokens, precision=0, minimum=0,
                                label="Healing tokens after (0 = off)")
        with gr.Column(min_width=200):
            start = gr.Button("▶ Start", variant="primary")
            stop = gr.Button("■ Stop", variant="stop")
    return [init, lr, epochs, loss, heal_tokens], start, stop


def _live_view(studio: Studio) -> dict:
    """The device line, the progress bar, the charts and the per-layer table."""
    device_note = gr.Markdown()
    progress = gr.HTML(progress_html(studio.jobs.latest()))
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            losses = gr.Plot(show_label=False, elem_id="loss-chart")
        with gr.Column(scale=2):
            speed = gr.Plot(show_label=False)
            memory = gr.Plot(show_label=False)
    table = gr.Dataframe(layer_table([]), label="Layers", interactive=False, wrap=True)
    return {"device_note": device_note, "progress": progress, "losses": losses, "speed": speed, "memory": memory,
            "table": table}


def device_text(studio: Studio) -> str:
    loaded = studio.loaded
    where = str(loaded.device) if loaded else studio.model_config.device
    if where.startswith("cuda"):
        return f"Running on **{where}** with bf16 autocast."
    return "No GPU found: distillation runs on the **CPU** (expect minutes per 10K tokens on a small model)."


def _wire_run(studio: Studio, forms: list, start: gr.Button, stop: gr.Button, view: dict) -> None:
    """Keeping the forms as the studio's settings, Start and Stop."""
    def keep_settings(init_value, lr_value, epochs_value, loss_value, heal_value):
        """The forms as typed become the studio's settings, so a saved recipe and the CLI command show them."""
        studio.distill = replace(studio.distill, init=init_value, lr=float(lr_value or 0), epochs=int(epochs_value),
                                 loss=loss_value)
        studio.heal = replace(studio.heal, tokens=int(heal_value or 0))

    for form in forms:
        form.change(keep_settings, forms, None, show_progress="hidden", api_visibility="private")

    @user_errors
    def on_start(*values):
        keep_settings(*values)
        studio.distill.validate()
        studio.heal.validate()
        job = studio.start_distillation()
        gr.Info(f"started {job.run_dir.name}")
        return progress_html(job), device_text(studio)

    start.click(on_start, forms, [view["progress"], view["device_note"]], concurrency_id="model",
                concurrency_limit=1, api_name="start")

    def on_stop():
        job = studio.jobs.active()
        if job is None:
            gr.Info("no run is in progress")
            return
        job.stop()
        gr.Info("stopping after the current optimiser step; finished layers are kept")

    stop.click(on_stop, None, None, api_name="stop")


def _wire_poll(studio: Studio, timer: gr.Timer, seen: gr.State, view: dict) -> None:
    """Redraw the live view on each tick when the latest job has new events or a new status."""
    def poll(state):
        job = studio.jobs.latest()
        if job is None:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), state
        key = (job.id, len(job.events), job.status)
        if key == state:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), state
        announce_failure(job, state)
        events = job.events_since(0)
        return (progress_html(job), plot(loss_chart(events)), plot(throughput_chart(events)),
                plot(memory_chart(events)), layer_table(events), key)

    timer.tick(poll, seen, [view["progress"], view["losses"], view["speed"], view["memory"], view["table"], seen],
               show_progress="hidden", concurrency_limit=None, api_visibility="private")


def build(controller: Controller) -> dict:
    studio = controller.studio
    forms, start, stop = _settings_row(studio)
    recipe.build(controller, forms, lambda: form_values(studio))
    view = _live_view(studio)
    seen = gr.State(("", -1))  # (job id, events drawn) for this browser tab
    timer = gr.Timer(POLL_SECONDS)
    _wire_run(studio, forms, start, stop, view)
    _wire_poll(studio, timer, seen, view)

    def on_show():  # a recipe loaded in step 6 shows here; the forms keep the studio's settings as typed
        return device_text(studio), *form_values(studio)

    return {"on_show": (on_show, [], [view["device_note"], *forms]), "timer": timer, "progress": view["progress"],
            "losses": view["losses"]}
