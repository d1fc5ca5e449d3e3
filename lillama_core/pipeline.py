"""The end-to-end recipe shared by the CLI, the app's jobs and the benchmarks:
load -> check lengths -> calibrate -> plan -> distill -> evaluate, with every stage reported as events.
Evaluation is a separate step (`evaluate_run`) so callers can keep the student before measuring it."""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .compress.checkpoints import LayerCheckpoints
from .compress.loop import Compressor, RunResult, out_of_memory
from .config import CalibrationConfig, RunConfig
from .data.calibration import CalibrationData
from .data.generated import SAMPLING_SETTINGS, generated_rows, self_generate
from .errors import RunStopped
from .events import EventSink, Phase
from .metrics import evaluate as evaluation
from .metrics.record import EvalRecord, RunMetrics
from .modeling.loading import LoadedModel, load_model
from .modeling.packs import pack_low_rank
from .planning.cache import measurement_key, measurements_root, read_tensors, write_tensors
from .planning.planner import make_plan
from .planning.ranks import ModelShape, RankPlan, summarize
from .runtime.distributed import SINGLE, Parallel, device_for
from .runtime.failures import stage

PLAN_FILE = "plan.json"


@dataclass
class PipelineResult:
    run: RunResult
    loaded: LoadedModel  # the teacher; the student shares its untouched weights
    plan: RankPlan
    metrics: RunMetrics = field(default_factory=RunMetrics)


def calibrate(loaded: LoadedModel, config: CalibrationConfig, emit: EventSink | None = None,
              stop: threading.Event | None = None, parallel: Parallel = SINGLE) -> CalibrationData:
    """The calibration data of the loaded model's task (text: token sequences; speech: clips and transcripts),
    with `config.generated` of its rows written by the teacher (data/generated.py). Generation runs on the first
    process and its rows go to the others, so every process trains on the same data.

    Raises:
        CalibrationError: the calibration source is missing or unreadable.
        ConfigError: a generated share for a model that reads more than tokens.
        RunStopped: `stop` was set while the teacher wrote its rows.
    """
    data = loaded.task.calibrate(loaded, config)
    if not config.generated:
        return data
    if parallel.is_main:
        data = _teacher_written(loaded, data, config, emit or (lambda event: None), stop)
    return dataclasses.replace(data, sequences=parallel.broadcast_object(data.sequences))


def _teacher_written(loaded: LoadedModel, data: CalibrationData, config: CalibrationConfig, emit: EventSink,
                     stop: threading.Event | None) -> CalibrationData:
    """`data` with the config's share of rows written by the teacher, read from the measurement store when this
    teacher already wrote them for the same rows, share, seed and sampling settings on this kind of device."""
    key = measurement_key("generated", loaded, data, share=config.generated, seed=config.seed,
                          sampling=SAMPLING_SETTINGS)
    path = measurements_root() / f"{key}.safetensors"
    stored = (read_tensors(path) or {}).get("sequences")
    if stored is not None and stored.shape == data.sequences.shape:
        emit(Phase(name="calibration", detail=f"reusing the calibration text the teacher wrote before ({path})"))
        return dataclasses.replace(data, sequences=stored)
    rows = generated_rows(data.sequences.shape[0], config.generated)

    def progress(done: int, total: int) -> None:
        emit(Phase(name="calibration", detail=f"the teacher is writing calibration text: {done} of {total} sequences"))

    progress(0, rows)
    data = self_generate(loaded.model, data, config.generated, config.seed, progress, stop)
    write_tensors(path, {"sequences": data.sequences})
    return data


def planning_calibration(loaded: LoadedModel, config: RunConfig) -> CalibrationData | None:
    """The calibration data a plan is measured on: the calibration source drawn with exactly the tokens the
    plan's strategy reads. Sampling depends on the token budget, so every caller (the app, `lillama plan`,
    `lillama compress`, sweeps) draws it this way and finds the same stored measurement (planning/cache.py).

    Returns:
        None when the plan measures nothing on calibration data.

    Raises:
        CalibrationError: the calibration source is missing or unreadable.
    """
    tokens = config.plan.calibration_tokens
    # Real text only: a plan's measurements are short probes whose ranking of modules barely moves with the
    # domain, and sampling the teacher for them would cost minutes per plan and a cache entry per share.
    return loaded.task.calibrate(loaded, dataclasses.replace(config.calibration, tokens=tokens)) if tokens else None


def evaluate_pair(teacher: LoadedModel, student, config: RunConfig,
                  teacher_record: EvalRecord | None = None) -> tuple[EvalRecord, EvalRecord]:
    """Teacher and student scored on the same held-out data of the teacher's task; a known teacher record
    is reused. Raises CalibrationError (held-out data unreadable), ModelForwardError."""
    task = teacher.task
    held_out = task.held_out(teacher, config)
    batch = task.eval_batch_size(config)

    def score(model) -> EvalRecord:  # quality only: sizes are in the run's metrics already
        return evaluation.evaluate(model, teacher.tokenizer, task, held_out, batch, size=False)

    return teacher_record or score(teacher.model), score(student)


def stop_point(stop: threading.Event, stage: str) -> None:
    """Between stages that cannot be interrupted inside, a stop ends the run before the next one starts."""
    if stop.is_set():
        raise RunStopped(f"stopped by request after {stage}; nothing was compressed")


def run_pipeline(config: RunConfig, loaded: LoadedModel | None = None, plan: RankPlan | None = None,
                 on_event: EventSink | None = None, stop: threading.Event | None = None,
                 evaluate: bool = True, teacher_ppl: float | None = None,
                 checkpoint_dir: Path | None = None, parallel: Parallel = SINGLE) -> PipelineResult:
    """Compress the configured model: load, calibrate, plan, distil, heal, then (optionally) evaluate.

    Under data parallelism every process calls this; only the first plans, heals, evaluates and writes.

    Args:
        config: the whole recipe.
        loaded: the teacher, already loaded (skips loading).
        plan: a rank plan to use instead of the one the config would build.
        on_event: receives every progress event.
        stop: set to stop within one optimiser step; finished layers are kept.
        evaluate: score teacher and student on held-out data after compressing.
        teacher_ppl: a known teacher perplexity on the same held-out text (skips scoring the teacher).
        checkpoint_dir: where each finished layer is saved with the plan; layers already there are restored.
        parallel: this process's place among data-parallel processes.

    Returns:
        PipelineResult: the RunResult (student, plans, layer reports), the loaded teacher, the plan and the
        run's RunMetrics.

    Raises:
        ConfigError: invalid settings, or a calibration seq_len beyond the model's positions (before any work).
        ModelLoadError, CalibrationError, RankPlanError: the model, the data or the plan.
        ModelForwardError: anything the model's own code raised, naming the stage, layer and model class.
        OutOfMemoryError: the accelerator ran out of memory at any stage.
        RunStopped: a stop before distillation began (nothing was compressed).
    """
    config.validate()
    emit = on_event or (lambda event: None)
    try:
        result = _run_pipeline(config, loaded, plan, emit, stop, checkpoint_dir, parallel)
    except torch.OutOfMemoryError:
        raise out_of_memory(emit) from None
    if evaluate and parallel.is_main:
        evaluate_run(result, config, emit, stop, teacher_ppl)
    return result


def evaluate_run(result: PipelineResult, config: RunConfig, on_event: EventSink | None = None,
                 stop: threading.Event | None = None, teacher_ppl: float | None = None) -> RunMetrics:
    """Teacher and student quality on held-out data, added to `result.metrics` (returned too). After a stop
    nothing is measured: the partial student is evaluated later. Raises OutOfMemoryError (advice) and
    ModelForwardError (a model's forward failed); the student is untouched either way."""
    emit = on_event or (lambda event: None)
    metrics, loaded = result.metrics, result.loaded
    if stop is not None and stop.is_set():
        return metrics
    start = time.time()
    emit(Phase(name="evaluate", detail="perplexity of teacher and student"))
    try:
        with stage("evaluation", model=loaded.model):
            reuse = teacher_ppl is not None and loaded.task.teacher_is_perplexity
            known = EvalRecord(perplexity=teacher_ppl) if reuse else None
            teacher, student = evaluate_pair(loaded, result.run.student, config, known)
            metrics.add_evaluation(teacher, student)
            metrics.eval_seq_len = loaded.task.eval_window(config, loaded.model)
        if config.eval.tasks:
            _score_zero_shot(result, config, emit, stop)
    except torch.OutOfMemoryError:
        raise out_of_memory(emit) from None
    metrics.seconds = (metrics.seconds or 0.0) + time.time() - start
    return metrics


def _score_zero_shot(result: PipelineResult, config: RunConfig, emit: EventSink,
                     stop: threading.Event | None) -> None:
    """Zero-shot accuracy (lm-eval) of teacher and student into the run's metrics; a stop leaves it out (the student
    is finished, only its accuracy is missing)."""
    from .metrics.zeroshot import score_pair

    loaded = result.loaded
    emit(Phase(name="evaluate", detail=f"zero-shot accuracy of teacher and student on {', '.join(config.eval.tasks)}"))
    try:
        with stage("zero-shot evaluation", model=loaded.model):
            scored = score_pair(loaded.model, result.run.student, loaded.tokenizer, config.eval.tasks,
                                config.eval.limit, config.eval.task_data, stop=stop)
        result.metrics.zero_shot = scored["zero_shot"]
    except RunStopped:
        pass


def _run_pipeline(config: RunConfig, loaded: LoadedModel | None, plan: RankPlan | None, emit: EventSink,
                  stop: threading.Event | None, checkpoint_dir: Path | None, parallel: Parallel) -> PipelineResult:
    start = time.time()
    stop = stop or threading.Event()
    if loaded is None:
        emit(Phase(name="load", detail=f"loading {config.model.name}"))
        loaded = load_model(dataclasses.replace(config.model, device=device_for(parallel, config.model.device)))
    stop_point(stop, "loading the model")
    for notice in loaded.task.check(config, loaded.model):
        emit(Phase(name="check", detail=notice))
    emit(Phase(name="calibration",
               detail=f"tokenising {config.calibration.tokens} tokens from {config.calibration.source}"))
    for warning in loaded.task.calibration_warnings(config.calibration):
        emit(Phase(name="calibration", detail=warning))
    calibration = calibrate(loaded, config.calibration, emit, stop, parallel)
    for warning in calibration.warnings:
        emit(Phase(name="calibration", detail=warning))
    stop_point(stop, "reading the calibration data")
    if plan is None:
        emit(Phase(name="plan", detail=f"{config.plan.strategy} plan"))
        if parallel.is_main:
            with stage("planning", model=loaded.model):
                plan = make_plan(loaded, config.plan, planning_calibration(loaded, config),
                                 config.calibration.batch_size, emit, stop)
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
        from .compress.heal import heal

        try:
            with stage("healing", model=run.student):
                heal_metrics = heal(run.student, loaded.model, calibration, config.heal, emit, stop)
        except RunStopped:
            run.status = "stopped"  # the distilled layers stand; only the healing was cut short
    if config.distill.pack and run.applied.ranks and parallel.is_main:
        with stage("packing", model=run.student):
            pack_low_rank(run.student, calibration.model_inputs(slice(0, 1), loaded.device))
    applied = summarize(run.applied, ModelShape.of(loaded.model))
    shape = ModelShape.of(loaded.model)
    metrics = RunMetrics(model=config.model.name, status=run.status, device=str(loaded.device),
                         params_before=applied.params_before, params_after=applied.params_after,
                         reduction=applied.reduction, weight_bytes_before=applied.weight_bytes_before,
                         weight_bytes_after=applied.weight_bytes_after,
                         planned_reduction=summarize(plan, shape).reduction, tokens=run.tokens,
                         compress_seconds=run.seconds, layers_done=run.applied.layers(shape),
                         unreached_experts=sum(layer.unreached_experts for layer in run.layers), extra=heal_metrics)
    metrics.seconds = time.time() - start
    return PipelineResult(run, loaded, plan, metrics)
