"""Panel 5: teacher vs student on held-out text (perplexity; for speech models, held-out clips scored
against their true texts or the teacher's transcripts), speed, size and memory; export."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import gradio as gr
import pandas as pd

from lillama_core.calibration import read_eval_text
from lillama_core.errors import ExportError
from lillama_core.evaluate import eval_windows, generation_speed, model_size, perplexity
from lillama_core.export import MODELING_FILE, export_student
from lillama_core.quantize import MODES, quantize_weights, serialized_bytes
from lillama_core.speech import reference_transcripts, speech_metrics

from .charts import comparison_chart, human, human_bytes
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
                           info="a .wav/.flac file or folder; a .txt transcript beside each clip (same name) gives "
                                "a true word error rate. synthetic: generated clips, scored against the teacher's "
                                "transcripts")
    results = gr.Dataframe(interactive=False, label="Teacher vs student")
    chart = gr.Plot(show_label=False)
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
