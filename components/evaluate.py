"""Panel 5: teacher vs student on held-out text (perplexity; for speech models, held-out clips scored
against their true texts or the teacher's transcripts), speed, size and memory; zero-shot accuracy on lm-eval's
standard tasks with generation quality; export."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import gradio as gr
import pandas as pd

from lillama_core.calibration import read_eval_text
from lillama_core.errors import ConfigError, ExportError
from lillama_core.evaluate import eval_windows, generation_speed, model_size, perplexity
from lillama_core.export import MODELING_FILE, export_student
from lillama_core.generation import generation_quality
from lillama_core.jobs import write_json
from lillama_core.quantize import MODES, quantize_weights, serialized_bytes
from lillama_core.speech import reference_transcripts, speech_metrics
from lillama_core.zeroshot import SUITES, score_pair, score_tasks, task_list

from .charts import accuracy_chart, comparison_chart, human, human_bytes
from .common import plot, user_errors
from .studio import Studio

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,80}$")


def zip_atomically(folder: Path) -> str:
    """folder.zip, written under a temporary name first so a half-written archive is never offered."""
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}.zip-") as tmp:
        partial = shutil.make_archive(str(Path(tmp) / folder.name), "zip", root_dir=folder.parent,
                                      base_dir=folder.name)
        final = folder.with_name(folder.name + ".zip")
        os.replace(partial, final)
    return str(final)


EXPORT_WEIGHTS = {"float": None, **{mode: mode for mode in MODES}}


def check_export_name(name: str) -> str:
    name = (name or "").strip()
    if not SAFE_NAME.fullmatch(name) or ".." in name:
        raise ExportError("export name: letters, digits, '.', '_' and '-' only, no path separators")
    return name


def measure(model, tokenizer, windows, label: str, batch_sizes=(1,)) -> dict:
    row = {"model": label, "perplexity": perplexity(model, windows).perplexity}
    for batch in batch_sizes:
        speed = generation_speed(model, model.config.vocab_size, batch_size=batch, prompt_tokens=64, new_tokens=32)
        row["generate_tokens_per_s" if batch == 1 else f"generate_tokens_per_s_b{batch}"] = speed.generate_tokens_per_s
        if batch == 1:
            row["prefill_tokens_per_s"] = speed.prefill_tokens_per_s
    size = model_size(model)
    row.update(parameters=size.parameters, weight_bytes=serialized_bytes(model))
    if size.peak_memory_bytes is not None:
        row["peak_memory_bytes"] = size.peak_memory_bytes
    return row


def measure_speech(model, tokenizer, reference, label: str, batch_size: int) -> dict:
    """A speech model on held-out clips: perplexity of the teacher's transcripts, word error rate against the
    clips' true texts where they have them, else against the teacher's transcripts."""
    metrics = speech_metrics(model, reference, tokenizer, batch_size)
    size = model_size(model)
    return {"model": label, "perplexity": metrics["perplexity"], "wer": metrics["wer"],
            "wer_reference": reference.kind,
            "generate_tokens_per_s": metrics["transcribe_tokens_per_s"], "parameters": size.parameters,
            "weight_bytes": serialized_bytes(model)}


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
    return pd.DataFrame(shown)


def _pct(value: float | None, stderr: float | None = None) -> str:
    if value is None:
        return "–"
    return f"{value:.1%}" + (f" ± {stderr:.1%}" if stderr is not None else "")


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


def build(studio: Studio) -> dict:
    with gr.Row():
        text = gr.Textbox(value="default", label="Held-out text file",
                          info="default: WikiText-2 test (never used for calibration)")
        tokens = gr.Slider(512, 65536, value=studio.eval.tokens, step=512, label="Tokens scored")
        seq_len = gr.Dropdown([128, 256, 512, 1024], value=studio.eval.seq_len, label="Window")
        batch16 = gr.Checkbox(value=False, label="Also time generation at batch 16")
        int8 = gr.Checkbox(value=False, label="Add weight-only int8 and int4 copies")
        run = gr.Button("Evaluate teacher and student", variant="primary")
    with gr.Accordion("Speech models: held-out audio", open=False):
        audio = gr.Textbox(value=studio.eval.audio, label="Held-out speech",
                           info="a .wav file or folder; a .txt transcript beside each clip (same name) gives a true "
                                "word error rate. synthetic: generated clips, scored against the teacher's transcripts")
    results = gr.Dataframe(interactive=False, label="Teacher vs student")
    chart = gr.Plot(show_label=False)
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
    accuracy = gr.Dataframe(interactive=False, label="Accuracy: teacher vs student")
    accuracy_plot = gr.Plot(show_label=False)
    generation = gr.Dataframe(interactive=False, label="Generation quality", visible=False)
    gr.Markdown("### Export the student")
    with gr.Row():
        name = gr.Textbox(label="Export name", placeholder="smollm2-20pct")
        fmt = gr.Radio(["compressed (low-rank, smallest)", "merged dense (plain transformers)"],
                       value="compressed (low-rank, smallest)", label="Format")
        weights = gr.Radio(list(EXPORT_WEIGHTS), value="float", label="Weights",
                           info="int8/int4: integer weights, smaller files; loads with trust_remote_code")
        overwrite = gr.Checkbox(value=False, label="Replace an existing export of that name")
        export = gr.Button("Export", variant="primary")
    export_note = gr.Markdown()
    download = gr.DownloadButton("Download export (.zip)", visible=False)

    @user_errors
    def on_evaluate(text_value, tokens_value, seq_value, batch16_value, int8_value, audio_value="synthetic",
                    progress=gr.Progress()):
        loaded = studio.ensure_loaded()
        studio.eval = replace(studio.eval, text=studio.confine(text_value) or "default", tokens=int(tokens_value),
                              seq_len=int(seq_value), audio=studio.confine(audio_value or "") or "synthetic")
        if loaded.feature_extractor is not None:
            progress(0, desc="the teacher transcribes held-out clips")
            reference = reference_transcripts(loaded.model, loaded.tokenizer, loaded.feature_extractor,
                                              studio.calibration, studio.eval.audio)
            windows = None
        else:
            windows = eval_windows(loaded.tokenizer, read_eval_text(studio.eval.text), studio.eval.tokens,
                                   studio.eval.seq_len)
        batches = (1, 16) if batch16_value else (1,)
        key = (studio.model_config.name, studio.eval.text, studio.eval.tokens, studio.eval.seq_len)
        models = [("teacher", loaded.model, loaded.tokenizer)]
        student = studio.current_student()
        if student is None:
            gr.Warning("no student yet: showing the teacher alone")
        else:
            models.append(("student", student.model, student.tokenizer))
        if int8_value:
            models += [(f"{label} {mode}", quantize_weights(model, mode), tok)
                       for label, model, tok in models for mode in MODES]
        rows = []
        for i, (label, model, tok) in enumerate(models):
            progress(i / len(models), desc=label)
            if windows is None:
                rows.append(measure_speech(model, tok, reference, label, studio.calibration.batch_size))
            else:
                rows.append(measure(model, tok, windows, label, batches))
            base, _, mode = label.partition(" ")
            if mode:  # integer weights are buffers, not nn.Parameters: the count is the float model's
                rows[-1]["parameters"] = next(r["parameters"] for r in rows if r["model"] == base)
        studio.teacher_ppl[key] = rows[0]["perplexity"]
        return table(rows), plot(comparison_chart(rows))

    run.click(on_evaluate, [text, tokens, seq_len, batch16, int8, audio], [results, chart], concurrency_id="model",
              concurrency_limit=1, api_name="evaluate")

    @user_errors
    def on_accuracy(tasks_value, limit_value, prompts_value, every_run_value, progress=gr.Progress()):
        loaded = studio.ensure_loaded()
        if loaded.feature_extractor is not None:
            raise ConfigError("zero-shot accuracy scores text models; use the word error rate above for speech")
        chosen = task_list(tasks_value or [])
        limit = int(limit_value) or None
        studio.eval = replace(studio.eval, tasks=chosen if every_run_value else [], limit=limit)
        student = studio.current_student()

        def report(what: str, share: float) -> None:
            progress(share, desc=what)

        if student is None:
            gr.Warning("no student yet: scoring the teacher alone")
            scores = score_tasks(loaded.model, loaded.tokenizer, chosen, limit, on_progress=report)
            zero_shot = {"teacher": [s.to_dict() for s in scores]}
        else:
            record = score_pair(loaded.model, student.model, loaded.tokenizer, chosen, limit, on_progress=report)
            zero_shot = record["zero_shot"]
            keep_in_run(student.run_dir, record)
        shown = gr.update(visible=False)
        if prompts_value:
            models = {"teacher": (loaded.model, loaded.tokenizer)}
            if student is not None:
                models["student"] = (student.model, student.tokenizer)
            quality = {}
            for name, (model, tok) in models.items():
                progress(1.0, desc=f"{name}: greedy answers to {int(prompts_value)} instructions")
                quality[name] = generation_quality(model, tok, int(prompts_value))
            shown = gr.update(value=generation_table(quality), visible=True)
        return accuracy_summary(zero_shot), accuracy_table(zero_shot), plot(accuracy_chart(zero_shot)), shown

    score.click(on_accuracy, [tasks, limit, prompts, every_run], [accuracy_note, accuracy, accuracy_plot, generation],
                concurrency_id="model", concurrency_limit=1, api_name="accuracy")

    @user_errors
    def on_export(name_value, fmt_value, overwrite_value, weights_value="float", progress=gr.Progress()):
        student = studio.current_student()
        if student is None:
            raise gr.Error("no student to export yet: run a distillation or load a run in step 6")
        folder = studio.exports_root / check_export_name(name_value)
        progress(0.1, desc="writing safetensors")
        record = {"source_run": str(student.run_dir) if student.run_dir else None}
        merge = fmt_value.startswith("merged")
        out = export_student(student.model, student.tokenizer, folder, merge=merge, overwrite=overwrite_value,
                             record=record, quantize=EXPORT_WEIGHTS[weights_value],
                             feature_extractor=student.feature_extractor)
        progress(0.6, desc="zipping")
        archive = zip_atomically(out)
        size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        remote = ", trust_remote_code=True" if (out / MODELING_FILE).exists() else ""
        auto = "AutoModelForSpeechSeq2Seq" if student.feature_extractor is not None else "AutoModelForCausalLM"
        note = f"Exported to `{out}` ({human_bytes(size)}). Load it with `{auto}.from_pretrained('{out}'{remote})`."
        return note, gr.update(value=archive, visible=True)

    export.click(on_export, [name, fmt, overwrite, weights], [export_note, download], api_name="export")
    return {}
