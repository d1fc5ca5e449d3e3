"""Panel 6: sweep reduction levels, compare every finished run on quality against size, reload a run's
student into Chat and Evaluate, and load a run's recipe back into the forms."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import TYPE_CHECKING

import gradio as gr
import pandas as pd

from lillama_core.jobs import list_runs

from .charts import accuracy_tradeoff_chart, duration, human, human_bytes, tradeoff_chart
from .common import plot, user_errors
from .studio import Studio

if TYPE_CHECKING:  # the controller imports the panels
    from .controller import Controller

LEVELS = [5, 10, 20, 30, 40, 50]
QUALITY_AXES = {"perplexity": tradeoff_chart, "zero-shot accuracy": accuracy_tradeoff_chart}


def run_rows(studio: Studio) -> list[dict]:
    rows = []
    for record in list_runs(studio.jobs.runs_root, studio.jobs.jobs):
        m, c = record.metrics, record.config
        rows.append({
            "name": record.name, "status": record.status, "model": c.model.name if c else "?",
            "strategy": c.plan.strategy if c else "?", "init": c.distill.init if c else "?",
            "distilled": c.distill.train if c else "?", "tokens": m.get("tokens"),
            "reduction": m.get("reduction"), "params_after": m.get("params_after"),
            "weight_bytes_after": m.get("weight_bytes_after"), "teacher_ppl": m.get("teacher_ppl"),
            "student_ppl": m.get("student_ppl"), "seconds": m.get("seconds"), "student": record.has_student,
            "teacher_accuracy": m.get("teacher_accuracy"), "student_accuracy": m.get("student_accuracy"),
            "accuracy_retention": m.get("accuracy_retention"),
        })
    return rows


RUN_COLUMNS = ["run", "status", "model", "strategy", "init", "tokens", "reduction", "parameters", "teacher ppl",
               "student ppl", "time", "student saved"]


def runs_table(rows: list[dict]) -> pd.DataFrame:
    """One row per run, formatted; with no runs, the columns alone (an empty table still says what it lists)."""
    def fmt(value, kind):
        if value is None:
            return ""
        return {"pct": f"{value:.1%}", "ppl": f"{value:.2f}", "n": human(value), "b": human_bytes(value),
                "s": duration(value)}[kind]

    return pd.DataFrame([{
        "run": r["name"], "status": r["status"], "model": r["model"], "strategy": r["strategy"],
        "init": r["init"], "tokens": fmt(r["tokens"], "n"), "reduction": fmt(r["reduction"], "pct"),
        "parameters": fmt(r["params_after"], "n"), "teacher ppl": fmt(r["teacher_ppl"], "ppl"),
        "student ppl": fmt(r["student_ppl"], "ppl"), "accuracy": fmt(r["student_accuracy"], "pct"),
        "accuracy kept": fmt(r["accuracy_retention"], "pct"), "time": fmt(r["seconds"], "s"),
        "student saved": "yes" if r["student"] else "",
    } for r in rows], columns=RUN_COLUMNS)


def build(controller: Controller) -> dict:
    studio = controller.studio
    levels, sweep, stop, sweep_note = _sweep_controls()
    view = _runs_view()
    refreshed = _wire_refresh(studio, view)
    _wire_sweep(studio, levels, sweep, stop, sweep_note)
    _wire_run_actions(controller, view, sweep_note)
    return {"on_show": (refreshed, [view.axis], view.outputs)}


def _sweep_controls():
    with gr.Row():
        levels = gr.CheckboxGroup(LEVELS, value=[10, 20, 30, 40], label="Sweep: reductions (% of all parameters)",
                                  info="uses the current model, calibration, preset and distillation settings")
        with gr.Column(min_width=220):
            sweep = gr.Button("Run sweep", variant="primary")
            stop = gr.Button("Stop sweep", variant="stop")
    return levels, sweep, stop, gr.Markdown()


def _runs_view() -> SimpleNamespace:
    """The trade-off charts, the runs table and the actions on a picked run."""
    view = SimpleNamespace()
    view.axis = gr.Radio(list(QUALITY_AXES), value="perplexity", label="Quality axis",
                         info="zero-shot accuracy: runs scored with 'Also score these after every distillation' "
                              "(step 5)")
    with gr.Row():
        view.by_params = gr.Plot(show_label=False)
        view.by_memory = gr.Plot(show_label=False)
    view.refresh = gr.Button("Refresh runs", size="sm")
    view.table = gr.Dataframe(runs_table([]), interactive=False, label="Every run (newest first)", wrap=True)
    with gr.Row():
        view.pick = gr.Dropdown([], label="Run", scale=3)
        view.reload = gr.Button("Load its student into Chat and Evaluate", scale=2)
        view.load_recipe = gr.Button("Load its recipe into the forms", scale=2)
        view.resume = gr.Button("Resume it (interrupted runs)", scale=1)
    view.details = gr.Code(language="json", label="Run config and metrics")
    view.outputs = [view.table, view.by_params, view.by_memory, view.pick]
    return view


def _wire_refresh(studio: Studio, view: SimpleNamespace):
    def refreshed(axis_value="perplexity"):
        rows = run_rows(studio)
        chart = QUALITY_AXES.get(axis_value, tradeoff_chart)
        finished = [r for r in rows if r["student_ppl"] or r["student_accuracy"] is not None]
        names = [r["name"] for r in rows]
        return (runs_table(rows), plot(chart(finished, "params_after", "parameters")),
                plot(chart(finished, "weight_bytes_after", "weight memory (bytes)")),
                gr.update(choices=names, value=names[0] if names else None))

    view.refresh.click(refreshed, view.axis, view.outputs, api_name="runs")
    view.axis.change(refreshed, view.axis, view.outputs, api_visibility="private")
    return refreshed


def _wire_sweep(studio: Studio, levels, sweep, stop, sweep_note) -> None:
    @user_errors
    def on_sweep(chosen):
        studio.start_sweep([level / 100 for level in chosen])
        return (f"Sweep started: {len(chosen)} runs, one after another. Follow it live in step 3; "
                f"each run gets its own folder under `{studio.jobs.runs_root}`.")

    sweep.click(on_sweep, levels, sweep_note, concurrency_id="model", concurrency_limit=1, api_name="sweep")

    def on_stop():
        job = studio.jobs.active()
        if job is not None and job.kind == "sweep":
            job.stop()
            return "Stopping the sweep after the current optimiser step."
        return "No sweep is running."

    stop.click(on_stop, None, sweep_note, api_name="stop_sweep")


def _wire_run_actions(controller: Controller, view: SimpleNamespace, sweep_note) -> None:
    studio = controller.studio

    def on_pick(name):
        record = next((r for r in list_runs(studio.jobs.runs_root) if r.name == name), None)
        if record is None:
            return ""
        return json.dumps({"config": record.config.to_dict() if record.config else None,
                           "metrics": record.metrics}, indent=2, default=str)

    view.pick.change(on_pick, view.pick, view.details, api_name="run_details")

    @user_errors
    def on_reload(name):
        if not name:
            raise gr.Error("pick a run with a saved student first")
        run_dir = studio.jobs.run_folder(name)
        if not (run_dir / "student").exists():
            raise gr.Error(f"run {name} has no saved student (it stopped before its first layer finished)")
        student = studio.load_student(run_dir)
        gr.Info(f"student of {student.label} loaded: Chat and Evaluate now use it")

    view.reload.click(on_reload, view.pick, None, concurrency_id="model", concurrency_limit=1,
                      api_name="load_student")

    @user_errors
    def on_load_recipe(name):
        gr.Info(controller.load_run_recipe(name) + "; every step's forms show it")

    view.load_recipe.click(on_load_recipe, view.pick, None, api_name="load_run_recipe")

    @user_errors
    def on_resume(name):
        if not name:
            raise gr.Error("pick the run to resume first")
        job = studio.resume(studio.jobs.run_folder(name))
        return f"Resuming `{job.run_dir.name}` from its last finished layer; follow it in step 3."

    view.resume.click(on_resume, view.pick, sweep_note, concurrency_id="model", concurrency_limit=1,
                      api_name="resume")
