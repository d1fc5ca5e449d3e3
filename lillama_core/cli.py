"""`lillama compress | resume | eval | chat | export | plan`: the engine from the shell, with tqdm progress."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

from .config import ModelConfig, PlanConfig, RunConfig
from .config_args import ConfigArgs
from .errors import ConfigError, LillamaError, ModelForwardError
from .events import Event, LayerFinished, Phase, RunFinished, RunStarted, Step
from .metrics.retention import percent
from .modeling.quantize import MODES as QUANTIZE_MODES
from .runtime.distributed import Parallel, device_for, from_environment
from .runtime.finite import json_safe

QUANTIZE_EXPORT_HELP = (
    "store the exported linear weights as int8 (per channel) or int4 (HQQ, groups of 64), run by torchao kernels")

# The config fields each subcommand reads (sections, or single fields); `compress` reads them all.
SELECTIONS: dict[str, tuple[str, ...] | None] = {
    "compress": None,
    "plan": ("model", "plan", "calibration.source", "calibration.text_field", "calibration.dataset_config",
             "calibration.split", "calibration.chat_template"),
    "eval": ("model", "eval"),
    "chat": ("model",),
    "transcribe": ("model",),
}
# chat's sampling --temperature: a compress --temperature (the healing KL's) would read as the same knob
NO_SHORT_FORMS = ("--temperature",)


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
            if event.unreached_experts:
                tqdm.write(f"layer {event.layer}: {event.unreached_experts} expert(s) saw no calibration token "
                           "(their factors are a plain SVD split; more or more varied calibration text reaches them)",
                           file=sys.stderr)
        elif isinstance(event, RunFinished) and self.bar is not None:
            self.bar.close()
            if event.message:
                tqdm.write(event.message, file=sys.stderr)


def _add_config_args(p: argparse.ArgumentParser, command: str) -> None:
    """The generated flags of the fields `command` reads, and a recipe to start from."""
    flags = ConfigArgs(SELECTIONS[command], reserved=NO_SHORT_FORMS)
    flags.add_to(p)
    p.add_argument("--config", help="a recipe to start from: .yaml/.yml, or JSON such as a run folder's config.json; "
                                    "flags given override it, even where they repeat a default")
    p.add_argument("--print-config", action="store_true",
                   help="print the effective recipe as YAML and exit, loading no model")
    p.set_defaults(config_args=flags)


def _model_config(args) -> ModelConfig:
    return args.run_config.model


def _compress_parser(sub) -> None:
    c = sub.add_parser("compress", help="compress a model and export the student")
    c.set_defaults(subparser=c)
    c.add_argument("--plan", help="a rank plan JSON file (overrides --reduction/--rank/--strategy)")
    c.add_argument("--no-eval", action="store_true", help="skip perplexity")
    c.add_argument("--out", help="export folder (required unless --print-config)")
    c.add_argument("--merge", action="store_true", help="export dense merged weights (no custom code needed)")
    c.add_argument("--quantize", choices=list(QUANTIZE_MODES), help=QUANTIZE_EXPORT_HELP)
    c.add_argument("--overwrite", action="store_true")
    c.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    c.add_argument("--runs-dir", default=None, help="where run folders go (default $LILLAMA_HOME/runs)")
    _add_config_args(c, "compress")


def _eval_parser(sub) -> None:
    e = sub.add_parser("eval", help="perplexity, zero-shot accuracy, speed and size of a model or an export")
    e.add_argument("--no-speed", action="store_true")
    e.add_argument("--teacher", help="with --tasks/--generation: also score this teacher side by side (default for an "
                                     "export: the teacher its record names)")
    e.add_argument("--no-teacher", action="store_true", help="score the model alone, even an export")
    e.add_argument("--generation", type=int, default=0, metavar="PROMPTS",
                   help="greedy answers to this many Alpaca seed instructions: repetition (distinct-2/3, longest "
                        "repeated n-gram) and length (0: off)")
    e.add_argument("--max-new-tokens", type=int, default=96, help="--generation: tokens per answer at most")
    e.add_argument("--quantize", choices=list(QUANTIZE_MODES),
                   help="evaluate a weight-only quantized copy (torchao kernels): int8 per channel, or int4 (HQQ) "
                        "in groups of 64")
    e.add_argument("--json", action="store_true")
    _add_config_args(e, "eval")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lillama", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    _compress_parser(sub)

    r = sub.add_parser("resume", help="continue an interrupted run from its last finished layer")
    r.add_argument("run_dir")
    r.add_argument("--out", required=True, help="export folder")
    r.add_argument("--merge", action="store_true")
    r.add_argument("--quantize", choices=list(QUANTIZE_MODES), help=QUANTIZE_EXPORT_HELP)
    r.add_argument("--overwrite", action="store_true")
    r.add_argument("--no-eval", action="store_true")
    r.add_argument("--json", action="store_true")

    _eval_parser(sub)

    ch = sub.add_parser("chat", help="chat with a model or an export, streamed")
    ch.add_argument("--prompt", help="one prompt; without it, read prompts from stdin")
    ch.add_argument("--max-new-tokens", type=int, default=200)
    ch.add_argument("--temperature", type=float, default=0.7)
    ch.add_argument("--top-p", type=float, default=0.9)
    ch.add_argument("--seed", type=int, default=0)
    _add_config_args(ch, "chat")

    tr = sub.add_parser("transcribe", help="transcribe .wav or .flac files with a speech model (Whisper) or its export")
    tr.add_argument("audio", nargs="+", help=".wav or .flac files")
    tr.add_argument("--max-new-tokens", type=int, default=128)
    _add_config_args(tr, "transcribe")

    x = sub.add_parser("export", help="re-export a compressed folder, e.g. merged to dense")
    x.add_argument("source")
    x.add_argument("--out", required=True)
    x.add_argument("--merge", action="store_true",
                   help="dense weights in the teacher's classes: teacher-sized, keeps the quality change, "
                        "not the savings")
    x.add_argument("--quantize", choices=list(QUANTIZE_MODES), help=QUANTIZE_EXPORT_HELP)
    x.add_argument("--overwrite", action="store_true")
    x.add_argument("--trust-remote-code", action="store_true",
                   help="run the teacher code an export of a trust_remote_code model ships")

    pl = sub.add_parser("plan", help="print the rank plan and parameter accounting without compressing")
    pl.add_argument("--save", help="write the plan JSON here")
    _add_config_args(pl, "plan")
    return parser


def compress_command(config: RunConfig, out: str, plan: str | None = None) -> list[str]:
    """The shortest `lillama compress` command line that runs `config`: flags only for settings that differ
    from the defaults, under the names `lillama compress --help` shows.

    Args:
        config: the recipe. A fixed rank replaces the reduction target on the command line (as in
            _run_config), so the command gives back a fixed-rank recipe with `plan.reduction` None.
        out: what --out shows: the export folder, or a placeholder the caller explains.
        plan: a rank plan JSON file for --plan (a plan edited by hand), or None.
    Returns:
        The words, starting with "lillama", "compress"; `shlex.join` makes them one shell line.
    Raises:
        ConfigError: a setting the command line cannot spell (ConfigArgs.words).
    """
    if config.plan.rank is not None:  # --rank drops the reduction: no --reduction none needed
        config = dataclasses.replace(config, plan=dataclasses.replace(config.plan, reduction=PlanConfig().reduction))
    words = ConfigArgs(SELECTIONS["compress"], reserved=NO_SHORT_FORMS).words(config)
    return ["lillama", "compress", *words, *(["--plan", plan] if plan else []), "--out", out]


def _run_config(args) -> RunConfig:
    """The recipe a command runs: the --config file (or the defaults) under the flags given, which win even
    where they repeat a default.

    Raises:
        ConfigError: an unreadable recipe, or settings that fail validation.
    """
    flags: ConfigArgs = args.config_args
    config = flags.apply(RunConfig.load(args.config) if args.config else RunConfig(), args)
    if flags.given(args).get("plan.rank") is not None:  # a fixed rank replaces the reduction target
        config.plan.reduction = None
    return config.validate()


def _compress_in(run_dir: Path, config: RunConfig, plan, args, parallel: Parallel) -> dict | None:
    """Run the pipeline with the run folder's log and layer checkpoints, export to --out, then evaluate
    (so a failing evaluation leaves the export in place). A model's failing forward leaves its traceback
    in the run folder."""
    from .runtime.failures import keep_traceback

    try:
        return _compress_export_evaluate(run_dir, config, plan, args, parallel)
    except ModelForwardError as exc:
        if parallel.is_main:
            keep_traceback(exc, run_dir)
        raise


def _compress_export_evaluate(run_dir: Path, config: RunConfig, plan, args, parallel: Parallel) -> dict | None:
    from .export import export_student, update_export_metrics
    from .jobs import LAYERS_DIR, append_event, evaluate_and_record, save_run
    from .modeling.loading import resolve_device
    from .pipeline import run_pipeline
    from .runtime.devicelock import DeviceLock

    progress = ProgressPrinter()

    def on_event(event):
        append_event(run_dir, event)
        progress(event)

    if parallel.is_main:
        tqdm_note(f"run folder: {run_dir} (resume with `lillama resume {run_dir} --out ...`)")
    device = resolve_device(device_for(parallel, config.model.device))
    with DeviceLock(str(device)).acquire(f"`lillama compress` into {run_dir.name}"):
        result = run_pipeline(config, plan=plan, on_event=on_event if parallel.is_main else None,
                              evaluate=False, checkpoint_dir=run_dir / LAYERS_DIR, parallel=parallel)
        if not parallel.is_main:  # the other processes only lent their share of the work
            parallel.finish()
            return None
        save_run(run_dir, config, result, keep_student=False)
        record = {"config": config.to_dict(), "metrics": result.metrics.to_dict(),
                  "plan": json.loads(result.run.applied.to_json()),
                  "layers": [e.to_dict() for e in result.run.layers], "run_dir": str(run_dir)}
        out = export_student(result.run.student, result.loaded.tokenizer, args.out, merge=args.merge,
                             overwrite=args.overwrite, record=record, quantize=args.quantize,
                             feature_extractor=result.loaded.feature_extractor)
        parallel.finish()  # the other processes wait here until the export is written
        if not args.no_eval:  # after the export: a failing evaluation must not lose the student
            evaluate_and_record(result, config, run_dir, on_event, None)
            update_export_metrics(out, result.metrics.to_dict())
    return _compress_summary(result.metrics, out, args.json)


def _compress_summary(m, out: Path, quiet: bool) -> dict:
    """What `compress` prints and returns: sizes, then whichever quality its task measured (RunMetrics m)."""
    summary = {"params_before": m.params_before, "params_after": m.params_after, "reduction": m.reduction,
               "teacher_ppl": m.teacher_ppl, "student_ppl": m.student_ppl, "seconds": m.seconds, "status": m.status,
               "tokens": m.tokens}
    if m.student_wer is not None:
        summary.update(teacher_wer=m.teacher_wer, student_wer=m.student_wer, wer_reference=m.wer_reference,
                       wer_scorer=m.wer_scorer)
    if m.zero_shot is not None:
        summary["zero_shot"] = m.zero_shot
    summary["out"] = str(out)
    if not quiet:
        if m.zero_shot is not None:
            print_accuracy(m.zero_shot)
        print(f"{m.params_before:,} -> {m.params_after:,} parameters ({m.reduction:.1%} fewer); exported to {out}")
        if m.teacher_ppl is not None:
            print(f"perplexity: teacher {m.teacher_ppl:.2f}, student {m.student_ppl:.2f}")
        if m.student_wer is not None:
            print(f"word error rate against the {m.wer_reference}: teacher {m.teacher_wer:.1%}, "
                  f"student {m.student_wer:.1%}")
    return summary


def tqdm_note(text: str) -> None:
    print(text, file=sys.stderr)


def cmd_compress(args, parser) -> dict:
    from .jobs import default_runs_root, new_run_dir
    from .planning.ranks import RankPlan

    parallel = from_environment()
    config = args.run_config
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
    except LillamaError as exc:
        from .jobs import LAYERS_DIR

        no_layers = not list((run_dir / LAYERS_DIR).glob("layer_*.json"))
        keep = isinstance(exc, ModelForwardError)  # its traceback is in the run folder
        if parallel.is_main and no_layers and not keep:  # nothing worth resuming: leave no clutter
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
    from .modeling.loading import LoadedModel, load_model, resolve_device, resolve_dtype

    path = Path(args.model).expanduser()
    if (path / RECORD_FILE).exists():
        device = resolve_device(args.device)
        model, tokenizer = load_compressed(path, device, resolve_dtype(args.dtype, device), args.trust_remote_code)
        return LoadedModel(model, tokenizer, str(path), str(path), device, next(model.parameters()).dtype,
                           load_feature_extractor(path))
    return load_model(_model_config(args))


# The EvalRecord fields `lillama eval` shows, in order, where measured; renamed where its output always
# spelled them differently (kept for scripts that read --json).
EVAL_FIELDS = ("perplexity", "tokens_scored", "wer", "wer_scorer", "clips", "transcribe_tokens_per_s", "parameters",
               "weight_bytes", "prefill_tokens_per_s", "generate_tokens_per_s")
EVAL_KEYS = {"tokens_scored": "eval_tokens", "clips": "eval_clips"}


def cmd_eval(args, parser) -> dict:
    """A model alone on held-out data of its task: quality, size, and (text models) speed at batch 1."""
    from .config import EvalConfig, RunConfig
    from .metrics.evaluate import evaluate
    from .metrics.zeroshot import task_list
    from .modeling.discovery import count_parameters
    from .modeling.quantize import quantize_weights
    from .runtime.graphs import GraphDecoder

    eval_config = args.run_config.eval
    tasks = task_list(eval_config.tasks, eval_config.task_data) if eval_config.tasks else []  # fails before loading
    loaded = _load_any(args)
    task = loaded.task
    model = quantize_weights(loaded.model, args.quantize) if args.quantize else loaded.model
    config = RunConfig(eval=EvalConfig(text=args.eval_text, tokens=args.eval_tokens, seq_len=args.eval_seq_len,
                                       audio=args.eval_audio))
    for notice in task.eval_notices(config, model):
        tqdm_note(notice)
    held_out = task.held_out(loaded, config, standalone=True)
    graphs = GraphDecoder(model, on_warm_up=tqdm_note) if args.graphs else None
    record = evaluate(model, loaded.tokenizer, task, held_out, speed_batches=() if args.no_speed else (1,),
                      fit_positions=True, graphs=graphs)
    record.parameters = count_parameters(loaded.model)  # integer weights are buffers: count the float model's
    measured = record.to_dict()
    summary = {"model": args.model, "quantize": args.quantize, "graphs": args.graphs}
    summary.update({EVAL_KEYS.get(k, k): measured[k] for k in EVAL_FIELDS if k in measured})
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
    from .metrics.generation import generation_quality
    from .metrics.retention import compare
    from .metrics.zeroshot import score_tasks
    from .modeling.loading import load_model

    _quiet_lm_eval()
    eval_config = args.run_config.eval
    teacher = None if args.no_teacher else (args.teacher or _recorded_teacher(args.model))
    models = {"model": (model, loaded.tokenizer)}
    if teacher:
        tqdm_note(f"teacher: {teacher}")
        reference = load_model(ModelConfig(teacher, args.device, args.dtype, args.trust_remote_code))
        models = {"teacher": (reference.model, reference.tokenizer), "student": models["model"]}
    out = {}
    if tasks:
        scores = {name: score_tasks(m, tok, tasks, eval_config.limit, eval_config.task_data,
                                  on_progress=_progress_bar(name))
                  for name, (m, tok) in models.items()}
        out["zero_shot"] = {"limit": eval_config.limit, "data": eval_config.task_data,
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


def print_accuracy(zero_shot: dict) -> None:
    """Per-task accuracy: teacher vs student with retention when both were scored, else the model's acc and
    acc_norm; then the mean over the tasks where the teacher is clearly above chance."""
    if "tasks" not in zero_shot:
        print(f"{'task':<16}{'docs':>6}{'acc':>16}{'acc_norm':>16}{'chance':>8}{'seconds':>9}")
        for s in zero_shot["model"]:
            print(f"{s['task']:<16}{s['docs']:>6}{percent(s['acc'], s['acc_stderr']):>16}"
                  f"{percent(s['acc_norm'], s['acc_norm_stderr']):>16}{percent(s['chance']):>8}{s['seconds']:>9.0f}")
        return
    print(f"{'task':<16}{'metric':>9}{'docs':>6}{'chance':>8}{'teacher':>16}{'student':>16}{'retention':>10}"
          f"{'above chance':>13}{'same answer':>12}")
    for r in zero_shot["tasks"]:
        print(f"{r['task']:<16}{r['metric']:>9}{r['docs']:>6}{percent(r['chance']):>8}"
              f"{percent(r['teacher'], r['teacher_stderr']):>16}{percent(r['student'], r['student_stderr']):>16}"
              f"{percent(r['retention']):>10}{percent(r['retention_above_chance']):>13}{percent(r['same_answer']):>12}")
    m = zero_shot["summary"]
    if m["tasks"]:
        print(f"mean over the tasks where the teacher is clearly above chance ({', '.join(m['tasks'])}): teacher "
              f"{percent(m['teacher_mean'])}, student {percent(m['student_mean'])}: keeps {percent(m['retention'])} "
              f"({percent(m['retention_above_chance'])} of the teacher's margin over chance)")
    else:
        print("the teacher is not clearly above chance on any task: no retention to report")


def print_generation(generation: dict) -> None:
    print(f"{'model':<10}{'prompts':>8}{'distinct-2':>11}{'distinct-3':>11}{'longest repeat':>15}{'tokens':>8}"
          f"{'hit cap':>8}")
    for name, g in generation.items():
        print(f"{name:<10}{g['prompts']:>8}{percent(g['distinct_2']):>11}{percent(g['distinct_3']):>11}"
              f"{g['longest_repeat']:>15.1f}{g['tokens']:>8.1f}{percent(g['hit_cap']):>8}")


def cmd_chat(args, parser) -> None:
    from .chat import SamplingConfig, stream_chat
    from .runtime.graphs import GraphDecoder

    loaded = _load_any(args)
    graphs = GraphDecoder(loaded.model) if args.graphs else None  # compiled once, reused by every prompt
    sampling = SamplingConfig(args.max_new_tokens, args.temperature, args.top_p, seed=args.seed)
    prompts = [args.prompt] if args.prompt else (line.strip() for line in sys.stdin)
    for prompt in prompts:
        if not prompt:
            continue
        shown = ""
        update = None
        for update in stream_chat(loaded.model, loaded.tokenizer, prompt, sampling, graphs=graphs):
            if update.note:
                print(update.note, file=sys.stderr, flush=True)
            sys.stdout.write(update.text[len(shown):])
            sys.stdout.flush()
            shown = update.text
        print(f"\n[{update.new_tokens} tokens, {update.tokens_per_s:.1f} tokens/s]", file=sys.stderr)


def cmd_transcribe(args, parser) -> None:
    from .tasks.speech import SAMPLING_RATE, read_audio

    loaded = _load_any(args)
    if not loaded.task.transcribes:
        raise ConfigError(f"{args.model} is a text model; `lillama transcribe` needs a speech model (Whisper)")
    for path in args.audio:
        result = loaded.task.transcribe(loaded, loaded.model, read_audio(Path(path)), SAMPLING_RATE,
                                        args.max_new_tokens)
        print(f"{path}: {result['text']}")
        print(f"[{result['tokens']} tokens, {result['tokens_per_s']:.1f} tokens/s]", file=sys.stderr)


def cmd_export(args, parser) -> None:
    from .errors import ExportError
    from .export import export_student, load_compressed, load_feature_extractor, read_record

    model, tokenizer = load_compressed(args.source, trust_remote_code=args.trust_remote_code)
    record = read_record(args.source)
    if record.get("quantize"):
        raise ExportError(f"{args.source} is already quantized ({record['quantize']}); export from the float student")
    kept = {k: v for k, v in record.items() if k not in ("format_version", "merged", "rank_map", "quantize")}
    out = export_student(model, tokenizer, args.out, merge=args.merge, overwrite=args.overwrite,
                         quantize=args.quantize, feature_extractor=load_feature_extractor(args.source), record=kept)
    print(f"exported to {out}")


def cmd_plan(args, parser) -> None:
    from .modeling.loading import load_model
    from .pipeline import planning_calibration
    from .planning.planner import make_plan
    from .planning.ranks import ModelShape, summarize
    from .runtime.failures import stage

    loaded = load_model(_model_config(args))
    config = args.run_config.plan
    calibration = planning_calibration(loaded, args.run_config)  # all make_plan reads; None if it reads none
    for warning in calibration.warnings if calibration else []:
        print(f"warning: {warning}", file=sys.stderr)
    with stage("planning", model=loaded.model):
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
    if args.command == "compress" and args.out is None and not args.print_config:
        args.subparser.error("the following arguments are required: --out")
    try:
        if hasattr(args, "config_args"):
            args.run_config = _run_config(args)
            args.config_args.expose(args, args.run_config)  # command bodies read args.model, args.eval_tokens
            if args.print_config:
                print(args.run_config.to_yaml(), end="")
                return 0
        _quiet_transformers()
        summary = COMMANDS[args.command](args, parser)
    except LillamaError as exc:
        if isinstance(exc, ModelForwardError) and exc.traceback_file is None:  # no run folder to keep it in
            from .runtime.failures import keep_traceback

            keep_traceback(exc)
        print(f"lillama: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lillama: interrupted", file=sys.stderr)
        return 130
    if getattr(args, "json", False) and summary is not None:
        print(json.dumps(json_safe(summary), allow_nan=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
