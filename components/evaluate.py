"""Panel 5: teacher vs student on held-out text (perplexity; for speech models, held-out clips scored
against their true texts or the teacher's transcripts), speed, size and memory; export."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import gradio as gr
import pandas as pd

from lillama_core.errors import ExportError
from lillama_core.export import MODELING_FILE, export_student
from lillama_core.metrics.evaluate import evaluate
from lillama_core.metrics.retention import percent as _pct
from lillama_core.metrics.zeroshot import SUITES
from lillama_core.modeling.quantize import MODES
from lillama_core.runtime.atomic import staged_file, write_json
from lillama_core.tasks import task_for

from . import recipe
from .charts import human, human_bytes
from .common import user_errors
from .settings import AccuracySettings, EvalSettings

if TYPE_CHECKING:  # the controller imports this module's helpers
    from .controller import Controller

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,80}$")


def zip_atomically(folder: Path) -> str:
    """folder.zip, written under a temporary name first so a half-written archive is never offered."""
    final = folder.with_name(folder.name + ".zip")
    with staged_file(final) as staged:  # make_archive adds ".zip" to the name it is given
        shutil.make_archive(str(staged.with_suffix("")), "zip", root_dir=folder.parent, base_dir=folder.name)
    return str(final)


EXPORT_WEIGHTS = {"float": None, **{mode: mode for mode in MODES}}


def check_export_name(name: str) -> str:
    name = (name or "").strip()
    if not SAFE_NAME.fullmatch(name) or ".." in name:
        raise ExportError("export name: letters, digits, '.', '_' and '-' only, no path separators")
    return name


def measure(model, tokenizer, task, held_out, label: str, batch_size: int, speed_batches=(1,)) -> dict:
    """One table row: the model's EvalRecord on the held-out data, labelled. Speech models' transcription
    speed stands in the generation-speed column."""
    row = {"model": label, **evaluate(model, tokenizer, task, held_out, batch_size, speed_batches).to_dict()}
    if "transcribe_tokens_per_s" in row:
        row.setdefault("generate_tokens_per_s", row["transcribe_tokens_per_s"])
    return row


# what an empty results table shows before the first evaluation (a text model's columns)
EMPTY_COLUMNS = ["model", "perplexity", "parameters", "weight memory", "prefill tok/s", "generate tok/s (batch 1)"]


def table(rows: list[dict]) -> pd.DataFrame:
    """One row per model; speed columns as measured (text: prefill and generation, speech: transcription)."""
    shown = []
    for r in rows:
        row = {"model": r["model"], "perplexity": f"{r['perplexity']:.2f}"}
        if "wer" in r:
            row[f"word error rate vs {r['wer_reference']}"] = f"{r['wer']:.1%}"
        row.update({"parameters": human(r["parameters"]), "weight memory": human_bytes(r["weight_bytes"])})
        if "prefill_tokens_per_s" in r:
            row["prefill tok/s"] = f"{r['prefill_tokens_per_s']:.0f}"
        speed = "generate tok/s (batch 1)" if "prefill_tokens_per_s" in r else "transcribe tok/s"
        row[speed] = f"{r['generate_tokens_per_s']:.1f}"
        if "generate_tokens_per_s_b16" in r:
            row["generate tok/s (batch 16)"] = f"{r['generate_tokens_per_s_b16']:.1f}"
        shown.append(row)
    return pd.DataFrame(shown) if shown else pd.DataFrame(columns=EMPTY_COLUMNS)


def accuracy_table(zero_shot: dict) -> pd.DataFrame:
    """One row per task: chance, the teacher's accuracy and, when a student was scored, its accuracy, retention
    (student / teacher), retention above chance and the share of documents where it picks the teacher's answer."""
    if "tasks" not in zero_shot:
        return pd.DataFrame([{"task": s["task"], "metric": "acc" if s["acc_norm"] is None else "acc_norm",
                              "docs": s["docs"], "chance": _pct(s["chance"]),
                              "teacher": _pct(*((s["acc"], s["acc_stderr"]) if s["acc_norm"] is None
                                                else (s["acc_norm"], s["acc_norm_stderr"])))}
                             for s in zero_shot["teacher"]])
    return pd.DataFrame([{"task": r["task"], "metric": r["metric"], "docs": r["docs"], "chance": _pct(r["chance"]),
                          "teacher": _pct(r["teacher"], r["teacher_stderr"]),
                          "student": _pct(r["student"], r["student_stderr"]), "retention": _pct(r["retention"]),
                          "above chance": _pct(r["retention_above_chance"]), "same answer": _pct(r["same_answer"])}
                         for r in zero_shot["tasks"]])


def accuracy_summary(zero_shot: dict) -> str:
    summary = zero_shot.get("summary")
    if summary is None:
        return "Teacher alone (no student yet)."
    if not summary["tasks"]:
        return "The teacher is not clearly above chance on any of these tasks: no retention to report."
    return (f"On the tasks where the teacher is clearly above chance ({', '.join(summary['tasks'])}), the student "
            f"keeps **{_pct(summary['retention'])}** of the teacher's mean accuracy ({_pct(summary['student_mean'])} "
            f"vs {_pct(summary['teacher_mean'])}); **{_pct(summary['retention_above_chance'])}** of its margin over "
            f"chance.")


def generation_table(generation: dict) -> pd.DataFrame:
    return pd.DataFrame([{"model": name, "prompts": g["prompts"], "distinct-2": _pct(g["distinct_2"]),
                          "distinct-3": _pct(g["distinct_3"]), "longest repeated n-gram": f"{g['longest_repeat']:.1f}",
                          "tokens per answer": f"{g['tokens']:.0f}", "hit the cap": _pct(g["hit_cap"])}
                         for name, g in generation.items()])


def keep_in_run(run_dir: Path | None, record: dict) -> None:
    """Add a student's accuracy to its run's metrics.json, so Explore can plot it; other metrics stay."""
    metrics = run_dir / "metrics.json" if run_dir else None
    if metrics is None or not metrics.exists():
        return
    write_json(metrics, {**json.loads(metrics.read_text()), **record})


def build(controller: Controller) -> dict:
    studio = controller.studio
    with gr.Row():
        text = gr.Textbox(value="default", label="Held-out text file",
                          info="default: WikiText-2 test (never used for calibration)")
        tokens = gr.Slider(512, 65536, value=studio.eval.tokens, step=512, label="Tokens scored")
        seq_len = gr.Dropdown([128, 256, 512, 1024], value=studio.eval.seq_len, label="Window",
                              allow_custom_value=True)  # a loaded recipe's may differ
        batch16 = gr.Checkbox(value=False, label="Also time generation at batch 16")
        int8 = gr.Checkbox(value=False, label="Add weight-only int8 and int4 copies")
        run = gr.Button("Evaluate teacher and student", variant="primary")
    with gr.Accordion("Speech models: held-out audio", open=False):
        audio = gr.Textbox(value=studio.eval.audio, label="Held-out speech",
                           info="a .wav/.flac file or folder; a .txt transcript beside each clip (same name) gives "
                                "a true word error rate. synthetic: generated clips, scored against the teacher's "
                                "transcripts")
    results = gr.Dataframe(table([]), interactive=False, label="Teacher vs student")
    chart = gr.Plot(show_label=False)
    accuracy_section(controller)
    export_section(controller)

    @user_errors
    def on_evaluate(text_value, tokens_value, seq_value, batch16_value, int8_value, audio_value="synthetic",
                    progress=gr.Progress()):  # noqa: B008 - gradio injects the progress tracker through this default
        settings = EvalSettings(text_value, int(tokens_value), int(seq_value), bool(batch16_value), bool(int8_value),
                                audio_value)
        return controller.evaluate(settings, progress)

    run.click(on_evaluate, [text, tokens, seq_len, batch16, int8, audio], [results, chart], concurrency_id="model",
              concurrency_limit=1, api_name="evaluate")

    forms = [text, tokens, seq_len, audio]
    seen = gr.State(studio.recipe_version)

    def on_show(version):
        held_out = studio.eval
        return recipe.shown_settings(studio, version, lambda: (held_out.text, held_out.tokens, held_out.seq_len,
                                                               held_out.audio), len(forms))

    return {"on_show": (on_show, [seen], [*forms, seen])}


def export_section(controller: Controller) -> None:
    """The export form: name, format (compressed or merged), integer weights; a zip to download."""
    studio = controller.studio
    gr.Markdown("### Export the student")
    with gr.Row():
        name = gr.Textbox(label="Export name", placeholder="smollm2-20pct")
        fmt = gr.Radio(["compressed (low-rank, smallest)", "merged dense (plain transformers)"],
                       value="compressed (low-rank, smallest)", label="Format",
                       info="merged: factors multiplied back, teacher-sized; keeps the quality change, not the savings")
        weights = gr.Radio(list(EXPORT_WEIGHTS), value="float", label="Weights",
                           info="int8/int4: integer weights, smaller files; loads with trust_remote_code")
        overwrite = gr.Checkbox(value=False, label="Replace an existing export of that name")
        export = gr.Button("Export", variant="primary")
    export_note = gr.Markdown()
    download = gr.DownloadButton("Download export (.zip)", visible=False)

    @user_errors
    def on_export(name_value, fmt_value, overwrite_value, weights_value="float",
                  progress=gr.Progress()):  # noqa: B008 - gradio injects the progress tracker through this default
        student = studio.current_student()
        if student is None:
            raise gr.Error("no student to export yet: run a distillation or load a run in step 6")
        folder = studio.exports_root / check_export_name(name_value)
        progress(0.1, desc="writing safetensors")
        merge = fmt_value.startswith("merged")
        out = export_student(student.model, student.tokenizer, folder, merge=merge, overwrite=overwrite_value,
                             record=studio.export_record(student), quantize=EXPORT_WEIGHTS[weights_value],
                             feature_extractor=student.feature_extractor)
        progress(0.6, desc="zipping")
        archive = zip_atomically(out)
        size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        remote = ", trust_remote_code=True" if (out / MODELING_FILE).exists() else ""
        auto = task_for(student.model.config).auto_class
        note = f"Exported to `{out}` ({human_bytes(size)}). Load it with `{auto}.from_pretrained('{out}'{remote})`."
        if merge:
            note += " A merged export is teacher-sized: it keeps the quality change of compression, not the savings."
        return note, gr.update(value=archive, visible=True)

    export.click(on_export, [name, fmt, overwrite, weights], [export_note, download], api_name="export")


def accuracy_section(controller: Controller) -> None:
    """Zero-shot accuracy of teacher and student (lm-eval on the offline splits), with generation quality."""
    gr.Markdown("### Zero-shot accuracy (lm-evaluation-harness)")
    with gr.Row():
        tasks = gr.CheckboxGroup(list(SUITES["zero-shot"]), value=["arc_easy", "piqa"], label="Tasks",
                                 info="lm-eval's own prompts and metrics on the real evaluation splits, offline")
        limit = gr.Slider(0, 1000, value=50, step=10, label="Documents per task",
                          info="the first N of each split; 0: whole splits (hours on a CPU)")
        prompts = gr.Slider(0, 40, value=0, step=5, label="Generation quality: instructions",
                            info="greedy answers to Alpaca seed tasks: repetition and length (0: skip)")
        every_run = gr.Checkbox(value=False, label="Also score these after every distillation",
                                info="run records keep it; Explore plots it")
        score = gr.Button("Score accuracy", variant="primary")
    accuracy_note = gr.Markdown()
    accuracy = gr.Dataframe(accuracy_table({"teacher": []}), interactive=False, label="Accuracy: teacher vs student")
    accuracy_plot = gr.Plot(show_label=False)
    generation = gr.Dataframe(interactive=False, label="Generation quality", visible=False)

    @user_errors
    def on_accuracy(tasks_value, limit_value, prompts_value, every_run_value,
                    progress=gr.Progress()):  # noqa: B008 - gradio injects the progress tracker through this default
        settings = AccuracySettings(tuple(tasks_value or ()), int(limit_value), int(prompts_value or 0),
                                    bool(every_run_value))
        return controller.accuracy(settings, progress)

    score.click(on_accuracy, [tasks, limit, prompts, every_run], [accuracy_note, accuracy, accuracy_plot, generation],
                concurrency_id="model", concurrency_limit=1, api_name="accuracy")
