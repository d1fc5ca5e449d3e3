"""Panel 1: pick the teacher model and the calibration data."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import gradio as gr

from lillama_core.config import CalibrationConfig
from lillama_core.errors import LillamaError
from lillama_core.modeling.loading import BUILTIN_MODELS

from . import recipe
from .charts import human, human_bytes
from .common import facts_table, user_errors
from .studio import Studio

OTHER = "other"
SOURCE_KINDS = ["Built-in", "Local file", "Hugging Face dataset"]
UPLOAD_TYPES = [".txt", ".jsonl", ".json", ".parquet", ".csv", ".wav", ".flac"]  # audio: for speech models


def model_card(studio: Studio) -> str:
    facts = studio.model_facts()
    if not facts:
        return "<p>No model loaded yet.</p>"
    shown = dict(facts)
    shown["parameters"] = f"{facts['parameters']:,} ({human(facts['parameters'])})"
    shown["weight_bytes"] = human_bytes(facts["weight_bytes"])
    shown["device"] = facts["device"] + ("" if facts["device"].startswith("cuda") else " (no GPU found: CPU, slower)")
    return facts_table(shown)


def calibration_from_inputs(studio: Studio, kind, path, text_field, dataset_config, split, tokens, seq_len,
                            batch, generated) -> CalibrationConfig:
    source = "default" if kind == SOURCE_KINDS[0] else studio.confine(path or "")
    if not source:
        raise gr.Error("give a file path or a dataset id for the calibration data")
    config = replace(studio.calibration, source=source, text_field=(text_field or "").strip() or None,
                     dataset_config=(dataset_config or "").strip() or None, split=(split or "train").strip(),
                     tokens=int(tokens), seq_len=int(seq_len), batch_size=int(batch), generated=float(generated))
    config.validate()
    return config


def calibration_preview(studio: Studio, loaded, config: CalibrationConfig) -> str:
    """Keep the settings and show what the model's task makes of them (sequences or clips, first samples)."""
    shown = loaded.task.preview(loaded, config)
    studio.calibration = config
    return shown


def source_kind(source: str) -> str:
    """The Source choice that shows a calibration source: built-in, a local file, or a dataset id."""
    if source == "default":
        return SOURCE_KINDS[0]
    return SOURCE_KINDS[1] if Path(source).expanduser().exists() else SOURCE_KINDS[2]


def form_values(studio: Studio) -> tuple:
    """Step 1's forms from the studio's settings (a loaded recipe): model choice, typed name, remote code,
    offload, the calibration inputs, and the model card."""
    name, cal = studio.model_config.name, studio.calibration
    builtin = name in BUILTIN_MODELS
    source = "" if cal.source == "default" else cal.source
    return (name if builtin else OTHER, gr.update(value="" if builtin else name, visible=not builtin),
            studio.model_config.trust_remote_code, studio.model_config.offload, source_kind(cal.source), source,
            cal.text_field or "", cal.dataset_config or "", cal.split, cal.tokens, cal.seq_len, cal.batch_size,
            cal.generated, model_card(studio))


def _model_column(studio: Studio) -> dict:
    """The teacher model's picker, its options, the Load button and the model card."""
    builtin_choices = [(m.description, m.name) for m in BUILTIN_MODELS.values()] + [
        ("Hugging Face id, local folder or .gguf file…", OTHER)]
    current = studio.model_config.name
    gr.Markdown("### Teacher model")
    choice = gr.Dropdown(builtin_choices, value=current if current in BUILTIN_MODELS else OTHER,
                         label="Model", interactive=True)
    custom = gr.Textbox(label="Hugging Face id, local model folder or .gguf file",
                        placeholder="HuggingFaceTB/SmolLM2-360M-Instruct  ·  /models/my-llama  ·  model.gguf",
                        value="" if current in BUILTIN_MODELS else current,
                        visible=current not in BUILTIN_MODELS)
    remote = gr.Checkbox(label="Trust remote code for this model (runs code from its repository)",
                         value=False, visible=studio.allow_remote_code)
    offload = gr.Checkbox(label="Offload: keep the blocks in host memory, one at a time on the GPU",
                          info="for models bigger than the GPU; slower; no effect on CPU",
                          value=studio.model_config.offload)
    load_button = gr.Button("Load model", variant="primary")
    card = gr.HTML(model_card(studio))
    return {"choice": choice, "custom": custom, "remote": remote, "offload": offload, "load": load_button,
            "card": card}


def _calibration_column(studio: Studio) -> dict:
    """The calibration source (built-in, a file or upload, a dataset), its budget and the preview."""
    gr.Markdown("### Calibration data")
    kind = gr.Radio(SOURCE_KINDS, value=SOURCE_KINDS[0], label="Source",
                    info="Built-in: WikiText-2 validation + 175 Alpaca seed tasks (chat-formatted)")
    with gr.Group(visible=False) as custom_source:
        path = gr.Textbox(label="File path or dataset id",
                          placeholder="data/my_corpus.jsonl  ·  wikitext (with config wikitext-2-raw-v1)")
        upload = gr.File(label="…or upload a file", file_types=UPLOAD_TYPES, file_count="single")
        with gr.Row():
            text_field = gr.Textbox(label="Text field (optional)", placeholder="text")
            dataset_config = gr.Textbox(label="Dataset config (optional)")
            split = gr.Textbox(label="Split", value="train")
    with gr.Row():
        tokens = gr.Slider(1024, 2_000_000, value=studio.calibration.tokens, step=1024,
                           label="Token budget", info="a few million on a GPU; 16K–100K on CPU")
        seq_len = gr.Dropdown([64, 128, 256, 512, 1024, 2048], value=studio.calibration.seq_len,
                              label="Sequence length", allow_custom_value=True)  # a recipe's may differ
        batch = gr.Slider(1, 64, value=studio.calibration.batch_size, step=1, label="Batch size")
    generated = gr.Slider(0.0, 1.0, value=studio.calibration.generated, step=0.05, label="Written by the teacher",
                          info="share of sequences the teacher continues after their first 8 tokens "
                               "(self-calibration): text from the model's own distribution, not one corpus's; "
                               "sampling costs minutes on a CPU")
    preview_button = gr.Button("Preview and count tokens")
    preview_box = gr.Markdown()
    return {"kind": kind, "custom_source": custom_source, "path": path, "upload": upload, "text_field": text_field,
            "dataset_config": dataset_config, "split": split, "tokens": tokens, "seq_len": seq_len, "batch": batch,
            "generated": generated, "preview": preview_button, "preview_box": preview_box}


def _wire_model(studio: Studio, m: dict) -> None:
    """Loading the teacher model."""
    @user_errors
    def on_load(selected, typed, trust, offload_value):
        name = typed.strip() if selected == OTHER else selected
        if not name:
            raise gr.Error("type a Hugging Face id, a local folder or a .gguf path")
        gr.Info(f"loading {name}: the first load of a GGUF model converts it once, which can take a minute")
        loaded = studio.load(name, trust, offload=offload_value)
        if loaded.task.load_note:
            gr.Info(loaded.task.load_note)
        return model_card(studio)

    m["load"].click(on_load, [m["choice"], m["custom"], m["remote"], m["offload"]], m["card"], concurrency_id="model",
                    concurrency_limit=1, api_name="load_model")


def _wire_calibration(studio: Studio, uploads_root: Path, c: dict, inputs: list) -> None:
    """Uploads, keeping the calibration settings as typed, and the preview."""
    @user_errors
    def on_upload(file):
        if file is None:
            return gr.skip()
        source = Path(file)
        uploads_root.mkdir(parents=True, exist_ok=True)
        target = uploads_root / Path(source.name).name  # a bare name: uploads stay inside uploads_root
        shutil.copyfile(source, target)
        return str(target)

    c["upload"].upload(on_upload, c["upload"], c["path"], api_name="upload_calibration")

    def on_settings(*values):
        """Keep the settings as typed; half-typed values are checked on preview and on start."""
        try:
            studio.calibration = calibration_from_inputs(studio, *values)
        except (gr.Error, LillamaError):
            pass

    for name in ("tokens", "seq_len", "batch", "generated", "kind", "path", "text_field", "dataset_config", "split"):
        c[name].change(on_settings, inputs, None, show_progress="hidden", api_visibility="private")

    @user_errors
    def on_preview(*values):
        config = calibration_from_inputs(studio, *values)
        loaded = studio.ensure_loaded()
        return calibration_preview(studio, loaded, config)

    c["preview"].click(on_preview, inputs, c["preview_box"], api_name="calibration")


def build(studio: Studio, uploads_root: Path) -> dict:
    with gr.Row(equal_height=False):
        with gr.Column(scale=1):
            m = _model_column(studio)
        with gr.Column(scale=1):
            c = _calibration_column(studio)

    inputs = [c[name] for name in ("kind", "path", "text_field", "dataset_config", "split", "tokens", "seq_len",
                                   "batch", "generated")]

    m["choice"].change(lambda v: gr.update(visible=v == OTHER), m["choice"], m["custom"], api_visibility="private")
    c["kind"].change(lambda k: gr.update(visible=k != SOURCE_KINDS[0]), c["kind"], c["custom_source"],
                     api_visibility="private")
    _wire_model(studio, m)
    _wire_calibration(studio, uploads_root, c, inputs)
    forms = [m["choice"], m["custom"], m["remote"], m["offload"], *inputs, m["card"]]
    seen = gr.State(studio.recipe_version)

    def on_show(version):
        return recipe.shown_settings(studio, version, lambda: form_values(studio), len(forms))

    return {"card": m["card"], "load": m["load"], "on_show": (on_show, [seen], [*forms, seen])}
