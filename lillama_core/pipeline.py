"""The end-to-end recipe shared by the CLI, the app's jobs and the benchmarks:
load -> calibrate -> plan -> distill -> evaluate, with every stage reported as events."""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .calibration import CalibrationData, load_calibration, read_eval_text
from .checkpoints import LayerCheckpoints
from .config import CalibrationConfig, RunConfig
from .distributed import SINGLE, Parallel, device_for
from .engine import Compressor, RunResult, make_plan, out_of_memory
from .errors import RunStopped
from .evaluate import eval_windows, perplexity
from .events import EventSink, Phase
from .models import LoadedModel, load_model
from .ranks import ModelShape, RankPlan, summarize
from .speech import (SYNTHETIC_AUDIO_WARNING, SYNTHETIC_SOURCES, reference_transcripts, speech_calibration,
                     speech_metrics)


PLAN_FILE = "plan.json"


@dataclass
class PipelineResult:
    run: RunResult
    loaded: LoadedModel  # the teacher; the student shares its untouched weights
    plan: RankPlan
    metrics: dict = field(default_factory=dict)


def evaluate_perplexity(model, tokenizer, config: RunConfig) -> float:
    windows = eval_windows(tokenizer, read_eval_text(config.eval.text), config.eval.tokens, config.eval.seq_len)
    return perplexity(model, windows).perplexity


def calibrate(loaded: LoadedModel, config: CalibrationConfig) -> CalibrationData:
    """Token sequences for a text model; audio clips with the teacher's transcripts for a speech model."""
    if loaded.feature_extractor is None:
        return load_calibration(config, loaded.tokenizer)
    return speech_calibration(loaded.model, loaded.tokenizer, loaded.feature_extractor, config)


def evaluate_speech(teacher: LoadedModel, student, config: RunConfig) -> dict:
    """Held-out clips stand in for text: perplexity of the teacher's transcripts, and word error rate against
    the clips' true texts where the evaluation audio has them, else against the teacher's transcripts."""
    reference = reference_transcripts(teacher.model, teacher.tokenizer, teacher.feature_extractor, config.calibration,
                                      config.eval.audio)
    metrics = {}
    for name, model in (("teacher", teacher.model), ("student", student)):
        result = speech_metrics(model, reference, teacher.tokenizer, config.calibration.batch_size)
        metrics.update({f"{name}_ppl": result["perplexity"], f"{name}_wer": result["wer"]})
    metrics["eval_clips"] = len(reference.ends)
    metrics["wer_reference"] = reference.kind
    return metrics


def stop_point(stop: threading.Event, stage: str) -> None:
    """Between stages that cannot be interrupted inside, a stop ends the run before the next one starts."""
    if stop.is_set():
        raise RunStopped(f"stopped by request after {stage}; nothing was compressed")


def run_pipeline(config: RunConfig, loaded: LoadedModel | None = None, plan: RankPlan | None = None,
                 on_event: EventSink | None = None, stop: threading.Event | None = None,
                 evaluate: bool = True, teacher_ppl: float | None = None,
                 checkpoint_dir: Path | None = None, parallel: Parallel = SINGLE) -> PipelineResult:
    """Compress the configured model. `plan` overrides the plan the config would build; a loaded
    model and a known teacher perplexity can be passed in to skip that work. With a checkpoint
    folder, every finished layer is saved there (with the plan) and layers already saved are reused.
    Running out of accelerator memory at any stage (planning, healing, evaluation too) is a user error.
    Under data parallelism every process calls this; only the first plans, heals, evaluates and writes."""
    config.validate()
    emit = on_event or (lambda event: None)
    try:
        return _run_pipeline(config, loaded, plan, emit, stop, evaluate, teacher_ppl, checkpoint_dir, parallel)
    except torch.OutOfMemoryError:
        raise out_of_memory(emit) from None


def _run_pipeline(config: RunConfig, loaded: LoadedModel | None, plan: RankPlan | None, emit: EventSink,
                  stop: threading.Event | None, evaluate: bool, teacher_ppl: float | None,
                  checkpoint_dir: Path | None, parallel: Parallel) -> PipelineResult:
    start = time.time()
    stop = stop or threading.Event()
    if loaded is None:
        emit(Phase("load", f"loading {config.model.name}"))
        loaded = load_model(dataclasses.replace(config.model, device=device_for(parallel, config.model.device)))
    stop_point(stop, "loading the model")
    emit(Phase("calibration", f"tokenising {config.calibration.tokens} tokens from {config.calibration.source}"))
    if loaded.feature_extractor is not None and config.calibration.source in SYNTHETIC_SOURCES:
        emit(Phase("calibration", SYNTHETIC_AUDIO_WARNING))
    calibration = calibrate(loaded, config.calibration)
    stop_point(stop, "reading the calibration data")
    if plan is None:
        emit(Phase("plan", f"{config.plan.strategy} plan"))
        if parallel.is_main:
            plan = make_plan(loaded, config.plan, calibration, config.calibration.batch_size, emit, stop)
        plan = parallel.broadcast_object(plan)
        stop_point(stop, "planning")
    checkpoints = None
    if checkpoint_dir is not None:
        checkpoints = LayerCheckpoints(checkpoint_dir)
        if parallel.is_main:
            Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
            plan.save(Path(checkpoint_dir) / PLAN_FILE)
    run = Compressor(loaded, calibration, plan, config.distill, config.calibration.batch_size, emit, stop,
                     config.seed, checkpoints, parallel).run()
    heal_metrics = {}
    # Healing is not data-parallel: the first process heals the student it will export.
    if config.heal.tokens and run.status == "completed" and run.applied.ranks and parallel.is_main:
        from .heal import heal

        try:
            heal_metrics = heal(run.student, loaded.model, calibration, config.heal, emit, stop)
        except RunStopped:
            run.status = "stopped"  # the distilled layers stand; only the healing was cut short
    applied = summarize(run.applied, ModelShape.of(loaded.model))
    metrics = {
        "model": config.model.name,
        "status": run.status,
        "device": str(loaded.device),
        "params_before": applied.params_before,
        "params_after": applied.params_after,
        "reduction": applied.reduction,
        "weight_bytes_before": applied.weight_bytes_before,
        "weight_bytes_after": applied.weight_bytes_after,
        "planned_reduction": summarize(plan, ModelShape.of(loaded.model)).reduction,
        "tokens": run.tokens,
        "compress_seconds": run.seconds,
        "layers_done": run.applied.layers(ModelShape.of(loaded.model)),
        **heal_metrics,
    }
    if evaluate and not stop.is_set() and parallel.is_main:  # after a stop the partial student is evaluated later
        emit(Phase("evaluate", "perplexity of teacher and student"))
        if loaded.feature_extractor is not None:
            metrics.update(evaluate_speech(loaded, run.student, config))
        else:
            if teacher_ppl is None:
                teacher_ppl = evaluate_perplexity(loaded.model, loaded.tokenizer, config)
            metrics["teacher_ppl"] = teacher_ppl
            metrics["student_ppl"] = evaluate_perplexity(run.student, loaded.tokenizer, config)
            if config.eval.tasks:
                from .zeroshot import score_pair

                emit(Phase("evaluate", f"zero-shot accuracy of teacher and student on {', '.join(config.eval.tasks)}"))
                try:
                    metrics.update(score_pair(loaded.model, run.student, loaded.tokenizer, config.eval.tasks,
                                              config.eval.limit, config.eval.task_data, stop=stop))
                except RunStopped:  # the student is finished; only its accuracy is left out
                    pass
    metrics["seconds"] = time.time() - start
    return PipelineResult(run, loaded, plan, metrics)
