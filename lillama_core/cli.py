"""`lillama compress | resume | eval | chat | export | plan`: the engine from the shell, with tqdm progress."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from .config import ACTIVATION_STORAGES, DEFAULT_GROUPS, GROUPS, INITS, LOSS_PATHS, STRATEGIES, CalibrationConfig, \
    DistillConfig, EvalConfig, ModelConfig, PlanConfig, RunConfig
from .distributed import Parallel, device_for, from_environment
from .errors import ConfigError, LillamaError
from .events import Event, LayerFinished, Phase, RunFinished, RunStarted, Step
from .quantize import MODES as QUANTIZE_MODES

RANK_MULTIPLE_HELP = PlanConfig.__dataclass_fields__["rank_multiple"].metadata["help"]
QUANTIZE_EXPORT_HELP = "store the exported linear weights as int8 (per channel) or int4 (groups of 64)"


def _quiet_transformers() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


class ProgressPrinter:
    """Turns engine events into a tqdm bar on stderr, so stdout stays clean for --json."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.bar = None

    def __call__(self, event: Event) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if isinstance(event, Phase):
            tqdm.write(f"[{event.name}] {event.detail}", file=sys.stderr)
        elif isinstance(event, RunStarted):
            tqdm.write(f"compressing layers {event.layers_to_compress} of {event.layers_total} on {event.device}: "
                       f"{event.params_before:,} -> {event.params_after:,} parameters", file=sys.stderr)
            self.bar = tqdm(total=event.steps_total, unit="step", file=sys.stderr, dynamic_ncols=True)
        elif isinstance(event, Step) and self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(layer=event.layer, loss_t=f"{event.loss_teacher_input:.4f}",
                                 loss_s=f"{event.loss_student_input:.4f}", tok_s=f"{event.tokens_per_s:,.0f}")
        elif isinstance(event, LayerFinished):
            tqdm.write(f"layer {event.layer}: held-out loss {event.init_loss:.4f} -> {event.best_loss:.4f} "
                       f"(best step {event.best_step}, {event.seconds:.1f}s)", file=sys.stderr)
        elif isinstance(event, RunFinished) and self.bar is not None:
            self.bar.close()
            if event.message:
                tqdm.write(event.message, file=sys.stderr)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help=ModelConfig.__dataclass_fields__["name"].metadata["help"])
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--trust-remote-code", action="store_true", help="run code shipped with a hub model")
    p.add_argument("--offload", action="store_true", help=ModelConfig.__dataclass_fields__["offload"].metadata["help"])


def _model_config(args) -> ModelConfig:
    return ModelConfig(args.model, args.device, args.dtype, args.trust_remote_code, offload=args.offload)


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eval-text", default="default", help="held-out text file (default: WikiText-2 test)")
    p.add_argument("--eval-tokens", type=int, default=EvalConfig.tokens)
    p.add_argument("--eval-seq-len", type=int, default=EvalConfig.seq_len)
    p.add_argument("--eval-audio", default=EvalConfig.audio,
                   help=EvalConfig.__dataclass_fields__["audio"].metadata["help"])


def _accuracy_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tasks", default="", help=EvalConfig.__dataclass_fields__["tasks"].metadata["help"])
    p.add_argument("--limit", type=int, default=None, help=EvalConfig.__dataclass_fields__["limit"].metadata["help"])
    p.add_argument("--task-data", choices=("offline", "hub"), default=EvalConfig.task_data,
                   help=EvalConfig.__dataclass_fields__["task_data"].metadata["help"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lillama", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compress", help="compress a model and export the student")
    c.set_defaults(subparser=c)
    _add_model_args(c)
    c.add_argument("--config", help="a saved run config JSON; flags given explicitly override it")
    c.add_argument("--calibration", default="default",
                   help=CalibrationConfig.__dataclass_fields__["source"].metadata["help"])
    c.add_argument("--text-field", default=None)
    c.add_argument("--dataset-config", default=None)
    c.add_argument("--split", default="train")
    c.add_argument("--tokens", type=int, default=CalibrationConfig.tokens)
    c.add_argument("--seq-len", type=int, default=CalibrationConfig.seq_len)
    c.add_argument("--batch-size", type=int, default=CalibrationConfig.batch_size)
    c.add_argument("--reduction", type=float, default=PlanConfig.reduction, help="share of all parameters to remove")
    c.add_argument("--rank", type=int, default=None, help="one fixed rank instead of a reduction target")
    c.add_argument("--strategy", choices=STRATEGIES, default=PlanConfig.strategy)
    c.add_argument("--layer-keep", type=float, default=PlanConfig.layer_keep)
    c.add_argument("--rank-multiple", type=int, default=PlanConfig.rank_multiple, help=RANK_MULTIPLE_HELP)
    c.add_argument("--groups", default=",".join(DEFAULT_GROUPS), help=f"comma-separated: {', '.join(GROUPS)}")
    c.add_argument("--plan", help="a rank plan JSON file (overrides --reduction/--rank/--strategy)")
    c.add_argument("--init", choices=INITS, default=DistillConfig.init)
    c.add_argument("--lr", type=float, default=DistillConfig.lr)
    c.add_argument("--epochs", type=int, default=DistillConfig.epochs)
    c.add_argument("--loss", choices=LOSS_PATHS, default=DistillConfig.loss)
    c.add_argument("--no-distill", action="store_true", help="factorise only (training-free baseline)")
    c.add_argument("--activations", choices=ACTIVATION_STORAGES, default=DistillConfig.activations,
                   help=DistillConfig.__dataclass_fields__["activations"].metadata["help"])
    c.add_argument("--heal-tokens", type=int, default=0, help="end-to-end KL healing after distillation (0 = off)")
    c.add_argument("--heal-lr", type=float, default=1e-4)
    c.add_argument("--seed", type=int, default=0)
    _eval_args(c)
    _accuracy_args(c)
    c.add_argument("--no-eval", action="store_true", help="skip perplexity")
    c.add_argument("--out", required=True, help="export folder")
    c.add_argument("--merge", action="store_true", help="export dense merged weights (no custom code needed)")
    c.add_argument("--quantize", choices=list(QUANTIZE_MODES), help=QUANTIZE_EXPORT_HELP)
    c.add_argument("--overwrite", action="store_true")
    c.add_argument("--json", action="store_true", help="print a JSON summary as the last line")

    c.add_argument("--runs-dir", default=None, help="where run folders go (default $LILLAMA_HOME/runs)")

    r = sub.add_parser("resume", help="continue an interrupted run from its last finished layer")
    r.add_argument("run_dir")
    r.add_argument("--out", required=True, help="export folder")
    r.add_argument("--merge", action="store_true")
    r.add_argument("--quantize", choices=list(QUANTIZE_MODES), help=QUANTIZE_EXPORT_HELP)
    r.add_argument("--overwrite", action="store_true")
    r.add_argument("--no-eval", action="store_true")
    r.add_argument("--json", action="store_true")

    e = sub.add_parser("eval", help="perplexity, speed and size of a model or an export")
    _add_model_args(e)
    _eval_args(e)
    _accuracy_args(e)
    e.add_argument("--teacher", help="with --tasks/--generation: also score this teacher side by side (default for an "
                                     "export: the teacher its record names)")
    e.add_argument("--no-teacher", action="store_true", help="score the model alone, even an export")
    e.add_argument("--generation", type=int, default=0, metavar="PROMPTS",
                   help="greedy answers to this many Alpaca seed instructions: repetition (distinct-2/3, longest "
                        "repeated n-gram) and length (0: off)")
    e.add_argument("--max-new-tokens", type=int, default=96, help="--generation: tokens per answer at most")
    e.add_argument("--no-speed", action="store_true")
    e.add_argument("--quantize", choices=list(QUANTIZE_MODES),
                   help="evaluate a weight-only quantized copy: int8 per channel, or int4 in groups of 64")
    e.add_argument("--json", action="store_true")

    ch = sub.add_parser("chat", help="chat with a model or an export, streamed")
    _add_model_args(ch)
    ch.add_argument("--prompt", help="one prompt; without it, read prompts from stdin")
    ch.add_argument("--max-new-tokens", type=int, default=200)
    ch.add_argument("--temperature", type=float, default=0.7)
    ch.add_argument("--top-p", type=float, default=0.9)
    ch.add_argument("--seed", type=int, default=0)

    tr = sub.add_parser("transcribe", help="transcribe .wav files with a speech model (Whisper) or its export")
    _add_model_args(tr)
    tr.add_argument("audio", nargs="+", help=".wav files")
    tr.add_argument("--max-new-tokens", type=int, default=128)

    x = sub.add_parser("export", help="re-export a compressed folder, e.g. merged to dense")
    x.add_argument("source")
    x.add_argument("--out", required=True)
    x.add_argument("--merge", action="store_true")
    x.add_argument("--quantize", choices=list(QUANTIZE_MODES), help=QUANTIZE_EXPORT_HELP)
    x.add_argument("--overwrite", action="store_true")

    pl = sub.add_parser("plan", help="print the rank plan and parameter accounting without compressing")
    _add_model_args(pl)
    pl.add_argument("--reduction", type=float, default=PlanConfig.reduction)
    pl.add_argument("--rank", type=int, default=None)
    pl.add_argument("--strategy", choices=STRATEGIES, default=PlanConfig.strategy)
    pl.add_argument("--layer-keep", type=float, default=PlanConfig.layer_keep)
    pl.add_argument("--rank-multiple", type=int, default=PlanConfig.rank_multiple, help=RANK_MULTIPLE_HELP)
    pl.add_argument("--groups", default=",".join(DEFAULT_GROUPS))
    pl.add_argument("--calibration", default="default", help="data the sensitivity and whitened energy plans measure")
    pl.add_argument("--text-field", default=None)
    pl.add_argument("--save", help="write the plan JSON here")
    return parser


def _plan_config(args) -> PlanConfig:
    return PlanConfig(strategy=args.strategy, reduction=None if args.rank else args.reduction, rank=args.rank,
                      layer_keep=args.layer_keep, groups=_groups(args.groups), rank_multiple=args.rank_multiple)


def _groups(text: str) -> list[str]:
    return [g.strip() for g in text.split(",") if g.strip()]


# compress flag -> (config section, key, conversion)
COMPRESS_FLAGS = {
    "model": ("model", "name", str), "device": ("model", "device", str), "dtype": ("model", "dtype", str),
    "trust_remote_code": ("model", "trust_remote_code", bool), "offload": ("model", "offload", bool),
    "calibration": ("calibration", "source", str), "text_field": ("calibration", "text_field", str),
    "dataset_config": ("calibration", "dataset_config", str), "split": ("calibration", "split", str),
    "tokens": ("calibration", "tokens", int), "seq_len": ("calibration", "seq_len", int),
    "batch_size": ("calibration", "batch_size", int),
    "reduction": ("plan", "reduction", float), "rank": ("plan", "rank", int), "strategy": ("plan", "strategy", str),
    "layer_keep": ("plan", "layer_keep", float), "groups": ("plan", "groups", _groups),
    "rank_multiple": ("plan", "rank_multiple", int),
    "init": ("distill", "init", str), "lr": ("distill", "lr", float), "epochs": ("distill", "epochs", int),
    "loss": ("distill", "loss", str), "no_distill": ("distill", "distill", lambda v: not v),
    "activations": ("distill", "activations", str),
    "heal_tokens": ("heal", "tokens", int), "heal_lr": ("heal", "lr", float),
    "eval_text": ("eval", "text", str), "eval_tokens": ("eval", "tokens", int),
    "eval_seq_len": ("eval", "seq_len", int), "eval_audio": ("eval", "audio", str),
    "tasks": ("eval", "tasks", _groups), "limit": ("eval", "limit", int), "task_data": ("eval", "task_data", str),
}


def _run_config(args, parser) -> RunConfig:
    """Flags over defaults; with --config, flags over the file, counting only flags changed from
    their default (so a file's value cannot be reset to the default from the command line)."""
    data = RunConfig.load(args.config).to_dict() if args.config else RunConfig().to_dict()
    defaults = args.subparser
    for dest, (section, key, convert) in COMPRESS_FLAGS.items():
        value = getattr(args, dest)
        if args.config and value == defaults.get_default(dest):
            continue
        data[section][key] = None if value is None else convert(value)
    if args.rank is not None:
        data["plan"]["reduction"] = None
    if args.seed != defaults.get_default("seed") or not args.config:
        data["seed"] = data["calibration"]["seed"] = args.seed
    return RunConfig.from_dict(data).validate()


def _compress_in(run_dir: Path, config: RunConfig, plan, args, parallel: Parallel) -> dict | None:
    """Run the pipeline with the run folder's log and layer checkpoints, then export to --out."""
    from .devicelock import DeviceLock
    from .export import export_student
    from .jobs import LAYERS_DIR, append_event, save_run
    from .models import resolve_device
    from .pipeline import run_pipeline

    progress = ProgressPrinter()

    def on_event(event):
        append_event(run_dir, event)
        progress(event)

    if parallel.is_main:
        tqdm_note(f"run folder: {run_dir} (resume with `lillama resume {run_dir} --out ...`)")
    device = resolve_device(device_for(parallel, config.model.device))
    with DeviceLock(str(device)).acquire(f"`lillama compress` into {run_dir.name}"):
        result = run_pipeline(config, plan=plan, on_event=on_event if parallel.is_main else None,
                              evaluate=not args.no_eval, checkpoint_dir=run_dir / LAYERS_DIR, parallel=parallel)
    if not parallel.is_main:  # the other processes only lent their share of the work
        parallel.finish()
        return None
    save_run(run_dir, config, result, keep_student=False)
    record = {"config": config.to_dict(), "metrics": result.metrics, "plan": json.loads(result.run.applied.to_json()),
              "layers": [e.to_dict() for e in result.run.layers], "run_dir": str(run_dir)}
    out = export_student(result.run.student, result.loaded.tokenizer, args.out, merge=args.merge,
                         overwrite=args.overwrite, record=record, quantize=args.quantize,
                         feature_extractor=result.loaded.feature_extractor)
    summary = {k: result.metrics.get(k) for k in ("params_before", "params_after", "reduction", "teacher_ppl",
                                                   "student_ppl", "seconds", "status", "tokens")}
    if "student_wer" in result.metrics:  # speech models
        summary.update({k: result.metrics[k] for k in ("teacher_wer", "student_wer", "wer_reference")})
    summary["out"] = str(out)
    if "zero_shot" in result.metrics:
        summary["zero_shot"] = result.metrics["zero_shot"]
        if not args.json:
            print_accuracy(summary["zero_shot"])
    if not args.json:
        print(f"{summary['params_before']:,} -> {summary['params_after']:,} parameters "
              f"({summary['reduction']:.1%} fewer); exported to {out}")
        if "teacher_ppl" in result.metrics:
            print(f"perplexity: teacher {summary['teacher_ppl']:.2f}, student {summary['student_ppl']:.2f}")
        if "student_wer" in summary:
            print(f"word error rate against the {summary['wer_reference']}: teacher {summary['teacher_wer']:.1%}, "
                  f"student {summary['student_wer']:.1%}")
    parallel.finish()  # the other processes wait here until the export is written
    return summary


def tqdm_note(text: str) -> None:
    print(text, file=sys.stderr)


def cmd_compress(args, parser) -> dict:
    from .jobs import default_runs_root, new_run_dir
    from .ranks import RankPlan

    parallel = from_environment()
    config = _run_config(args, parser)
    if config.eval.tasks:
        _quiet_lm_eval()
    plan = RankPlan.load(args.plan) if args.plan else None
    run_dir = None
    if parallel.is_main:
        _check_out(args)
        run_dir = new_run_dir(Path(args.runs_dir) if args.runs_dir else default_runs_root(), config)
        config.save(run_dir / "config.json")
    run_dir = Path(parallel.broadcast_object(run_dir and str(run_dir)))
    try:
        return _compress_in(run_dir, config, plan, args, parallel)
    except LillamaError:
        from .jobs import LAYERS_DIR

        no_layers = not list((run_dir / LAYERS_DIR).glob("layer_*.json"))
        if parallel.is_main and no_layers:  # nothing worth resuming: leave no clutter
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def cmd_resume(args, parser) -> dict:
    from .jobs import resumable

    parallel = from_environment()
    config, plan = resumable(Path(args.run_dir))
    if parallel.is_main:
        _check_out(args)
    return _compress_in(Path(args.run_dir), config, plan, args, parallel)


def _check_out(args) -> None:
    """Refuse an existing --out before hours of work, not after."""
    from .errors import ExportError

    out = Path(args.out).expanduser()
    if out.exists() and not args.overwrite:
        raise ExportError(f"{out} already exists; choose another folder or pass --overwrite")


def _load_any(args):
    """A model name/path, or a Lillama export folder."""
    from .export import RECORD_FILE, load_compressed, load_feature_extractor
    from .models import LoadedModel, load_model, resolve_device, resolve_dtype

    path = Path(args.model).expanduser()
    if (path / RECORD_FILE).exists():
        device = resolve_device(args.device)
        model, tokenizer = load_compressed(path, device, resolve_dtype(args.dtype, device))
        return LoadedModel(model, tokenizer, str(path), str(path), device, next(model.parameters()).dtype,
                           load_feature_extractor(path))
    return load_model(_model_config(args))


def cmd_eval(args, parser) -> dict:
    from .evaluate import eval_windows, generation_speed, model_size, perplexity
    from .calibration import read_eval_text

    from .quantize import quantize_weights, serialized_bytes
    from .zeroshot import task_list

    tasks = task_list(args.tasks, args.task_data) if args.tasks else []  # a bad name fails before any loading
    loaded = _load_any(args)
    model = quantize_weights(loaded.model, args.quantize) if args.quantize else loaded.model
    summary = {"model": args.model, "quantize": args.quantize}
    if loaded.feature_extractor is not None:
        summary.update(_speech_eval(loaded, model, args.eval_audio))
    else:
        windows = eval_windows(loaded.tokenizer, read_eval_text(args.eval_text), args.eval_tokens, args.eval_seq_len)
        ppl = perplexity(model, windows)
        summary.update(perplexity=ppl.perplexity, eval_tokens=ppl.tokens_scored)
    summary.update(parameters=model_size(loaded.model).parameters, weight_bytes=serialized_bytes(model))
    if loaded.feature_extractor is None and not args.no_speed:
        speed = generation_speed(model, loaded.model.config.vocab_size)
        summary.update(prefill_tokens_per_s=speed.prefill_tokens_per_s,
                       generate_tokens_per_s=speed.generate_tokens_per_s)
    if not args.json:
        for key, value in summary.items():
            print(f"{key:>24}: {value:,.3f}" if isinstance(value, float) else f"{key:>24}: {value}")
    if tasks or args.generation:
        summary.update(_side_by_side(args, loaded, model, tasks))
    return summary


def _recorded_teacher(model: str) -> str | None:
    """The teacher an export's record names (exports written by `lillama compress`), else None."""
    from .export import RECORD_FILE, read_record

    if not (Path(model).expanduser() / RECORD_FILE).exists():
        return None
    return ((read_record(Path(model).expanduser()).get("config") or {}).get("model") or {}).get("name")


def _side_by_side(args, loaded, model, tasks: list[str]) -> dict:
    """Zero-shot accuracy (lm-eval) and generation quality of the model, beside its teacher's when one is
    named (--teacher, or an export's record) and --no-teacher is not given."""
    from .generation import generation_quality
    from .models import load_model
    from .zeroshot import score_tasks
    from .zeroshot_compare import compare

    _quiet_lm_eval()
    teacher = None if args.no_teacher else (args.teacher or _recorded_teacher(args.model))
    models = {"model": (model, loaded.tokenizer)}
    if teacher:
        tqdm_note(f"teacher: {teacher}")
        reference = load_model(ModelConfig(teacher, args.device, args.dtype, args.trust_remote_code))
        models = {"teacher": (reference.model, reference.tokenizer), "student": models["model"]}
    out = {}
    if tasks:
        scores = {name: score_tasks(m, tok, tasks, args.limit, args.task_data, on_progress=_progress_bar(name))
                  for name, (m, tok) in models.items()}
        out["zero_shot"] = {"limit": args.limit, "data": args.task_data,
                            **(compare(scores["teacher"], scores["student"]) if teacher else {}),
                            **{name: [s.to_dict() for s in found] for name, found in scores.items()}}
    if args.generation:
        out["generation"] = {name: generation_quality(m, tok, args.generation, args.max_new_tokens)
                             for name, (m, tok) in models.items()}
    if not args.json:
        if tasks:
            print_accuracy(out["zero_shot"])
        if args.generation:
            print_generation(out["generation"])
    return out


def _quiet_lm_eval() -> None:
    import logging

    from datasets.utils.logging import disable_progress_bar

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    disable_progress_bar()


def _progress_bar(name: str):
    """A tqdm bar on stderr following score_tasks' progress (share of the model's scoring done)."""
    from tqdm import tqdm

    bar = tqdm(total=100, unit="%", file=sys.stderr, dynamic_ncols=True, desc=name)

    def update(what: str, share: float) -> None:
        bar.set_postfix_str(what)
        bar.update(round(100 * share) - bar.n)
        if share >= 1:
            bar.close()
    return update


def _pct(value: float | None, stderr: float | None = None) -> str:
    if value is None:
        return "-"
    return f"{value:.1%}" + (f" ±{stderr:.1%}" if stderr is not None else "")


def print_accuracy(zero_shot: dict) -> None:
    """Per-task accuracy: teacher vs student with retention when both were scored, else the model's acc and
    acc_norm; then the mean over the tasks where the teacher is clearly above chance."""
    if "tasks" not in zero_shot:
        print(f"{'task':<16}{'docs':>6}{'acc':>16}{'acc_norm':>16}{'chance':>8}{'seconds':>9}")
        for s in zero_shot["model"]:
            print(f"{s['task']:<16}{s['docs']:>6}{_pct(s['acc'], s['acc_stderr']):>16}"
                  f"{_pct(s['acc_norm'], s['acc_norm_stderr']):>16}{_pct(s['chance']):>8}{s['seconds']:>9.0f}")
        return
    print(f"{'task':<16}{'metric':>9}{'docs':>6}{'chance':>8}{'teacher':>16}{'student':>16}{'retention':>10}"
          f"{'above chance':>13}{'same answer':>12}")
    for r in zero_shot["tasks"]:
        print(f"{r['task']:<16}{r['metric']:>9}{r['docs']:>6}{_pct(r['chance']):>8}"
              f"{_pct(r['teacher'], r['teacher_stderr']):>16}{_pct(r['student'], r['student_stderr']):>16}"
              f"{_pct(r['retention']):>10}{_pct(r['retention_above_chance']):>13}{_pct(r['same_answer']):>12}")
    m = zero_shot["summary"]
    if m["tasks"]:
        print(f"mean over the tasks where the teacher is clearly above chance ({', '.join(m['tasks'])}): teacher "
              f"{_pct(m['teacher_mean'])}, student {_pct(m['student_mean'])}: keeps {_pct(m['retention'])} "
              f"({_pct(m['retention_above_chance'])} of the teacher's margin over chance)")
    else:
        print("the teacher is not clearly above chance on any task: no retention to report")


def print_generation(generation: dict) -> None:
    print(f"{'model':<10}{'prompts':>8}{'distinct-2':>11}{'distinct-3':>11}{'longest repeat':>15}{'tokens':>8}"
          f"{'hit cap':>8}")
    for name, g in generation.items():
        print(f"{name:<10}{g['prompts']:>8}{_pct(g['distinct_2']):>11}{_pct(g['distinct_3']):>11}"
              f"{g['longest_repeat']:>15.1f}{g['tokens']:>8.1f}{_pct(g['hit_cap']):>8}")


def _speech_eval(loaded, model, audio: str) -> dict:
    """A speech model alone has no teacher to compare with, so it is scored against true texts only."""
    from .speech import (SYNTHETIC_SOURCES, clip_features, normalized_words, transcribed_clips, transcript_prompt,
                         transcription_scores)

    needs = ("scoring a speech model needs recorded speech with its true texts: --eval-audio FOLDER of .wav clips, "
             "each with a .txt transcript of the same name")
    if audio in SYNTHETIC_SOURCES:
        raise ConfigError(needs)
    clips, texts = transcribed_clips(audio)
    if texts is None:
        raise ConfigError(f"{audio}: no transcripts beside the clips; {needs}")
    prompt = transcript_prompt(model, loaded.tokenizer)
    longest = getattr(model.config, "max_target_positions", CalibrationConfig.seq_len)
    result = transcription_scores(model, loaded.tokenizer, clip_features(loaded.feature_extractor, clips), prompt,
                                  min(CalibrationConfig.seq_len, longest), [normalized_words(t) for t in texts])
    return {"wer": result["wer"], "eval_clips": result["clips"],
            "transcribe_tokens_per_s": result["transcribe_tokens_per_s"]}


def cmd_chat(args, parser) -> None:
    from .chat import SamplingConfig, stream_chat

    loaded = _load_any(args)
    sampling = SamplingConfig(args.max_new_tokens, args.temperature, args.top_p, seed=args.seed)
    prompts = [args.prompt] if args.prompt else (line.strip() for line in sys.stdin)
    for prompt in prompts:
        if not prompt:
            continue
        shown = ""
        update = None
        for update in stream_chat(loaded.model, loaded.tokenizer, prompt, sampling):
            sys.stdout.write(update.text[len(shown):])
            sys.stdout.flush()
            shown = update.text
        print(f"\n[{update.new_tokens} tokens, {update.tokens_per_s:.1f} tokens/s]", file=sys.stderr)


def cmd_transcribe(args, parser) -> None:
    from .speech import read_wav, transcribe

    loaded = _load_any(args)
    if loaded.feature_extractor is None:
        raise ConfigError(f"{args.model} is a text model; `lillama transcribe` needs a speech model (Whisper)")
    for path in args.audio:
        result = transcribe(loaded.model, loaded.tokenizer, loaded.feature_extractor, read_wav(Path(path)),
                            args.max_new_tokens)
        print(f"{path}: {result['text']}")
        print(f"[{result['tokens']} tokens, {result['tokens_per_s']:.1f} tokens/s]", file=sys.stderr)


def cmd_export(args, parser) -> None:
    from .errors import ExportError
    from .export import export_student, load_compressed, load_feature_extractor, read_record

    model, tokenizer = load_compressed(args.source)
    record = read_record(args.source)
    if record.get("quantize"):
        raise ExportError(f"{args.source} is already quantized ({record['quantize']}); export from the float student")
    kept = {k: v for k, v in record.items() if k not in ("format_version", "merged", "rank_map", "quantize")}
    out = export_student(model, tokenizer, args.out, merge=args.merge, overwrite=args.overwrite,
                         quantize=args.quantize, feature_extractor=load_feature_extractor(args.source), record=kept)
    print(f"exported to {out}")


def cmd_plan(args, parser) -> None:
    from .engine import PLANNING_TOKENS, SENSITIVITY_TOKENS, make_plan
    from .models import load_model
    from .pipeline import calibrate
    from .ranks import ModelShape, summarize

    loaded = load_model(_model_config(args))
    config = _plan_config(args)
    calibration = None
    if config.uses_calibration:
        tokens = SENSITIVITY_TOKENS if config.strategy == "sensitivity" else PLANNING_TOKENS  # all make_plan reads
        calibration = calibrate(loaded, CalibrationConfig(source=args.calibration, text_field=args.text_field,
                                                          tokens=tokens))
    plan = make_plan(loaded, config, calibration)
    summary = summarize(plan, ModelShape.of(loaded.model))
    for row in summary.layers:
        kept = row["params_after"] / row["params_before"]
        print(f"layer {row['layer']:>3}: {row['compressed']} modules compressed, {kept:6.1%} of weights kept")
    for warning in summary.warnings:
        print(f"warning: {warning}")
    print(f"total: {summary.params_before:,} -> {summary.params_after:,} ({summary.reduction:.2%} fewer)")
    if args.save:
        plan.save(args.save)


COMMANDS = {"compress": cmd_compress, "resume": cmd_resume, "eval": cmd_eval, "chat": cmd_chat,
            "transcribe": cmd_transcribe, "export": cmd_export, "plan": cmd_plan}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_transformers()
    try:
        summary = COMMANDS[args.command](args, parser)
    except LillamaError as exc:
        print(f"lillama: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lillama: interrupted", file=sys.stderr)
        return 130
    if getattr(args, "json", False) and summary is not None:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
