"""A whole compression run: plan -> capture block inputs -> layer by layer -> student model.

Only one block is trained at a time, with its own optimiser, on activations cached for that block
alone; layers above the last compressed one are never touched, so a bottom-first run needs little
memory. Progress leaves as events; a stop request ends the run within one optimiser step and the
layers finished so far stay in the student.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import DistillConfig
from ..data.calibration import CalibrationData
from ..errors import CalibrationError, ConfigError, LillamaError, OutOfMemoryError, RankPlanError, RunStopped
from ..events import (
    Event,
    EventSink,
    LayerFinished,
    LayerStarted,
    Phase,
    RunError,
    RunFinished,
    RunStarted,
    RunStatus,
    Step,
)
from ..factorize.inits import init_named, to_low_rank
from ..factorize.svd import Covariance, serial_on_cpu
from ..modeling.discovery import Block, find_blocks, share_weights_copy
from ..modeling.loading import LoadedModel
from ..modeling.shipped import set_submodule
from ..planning.ranks import ModelShape, RankPlan, summarize
from ..runtime.distributed import SINGLE, Parallel
from ..runtime.failures import stage
from ..runtime.finite import require_finite_weights
from ..runtime.offload import is_streamed, resident, stream_block
from ..runtime.paths import lillama_home
from ..runtime.telemetry import MemoryMonitor, Throughput, eta_seconds
from .batching import batch_slices
from .capture import (
    BlockInputs,
    LinearCovariances,
    block_label,
    capture_block_inputs,
    run_block_over,
    unreached_experts,
)
from .checkpoints import LayerCheckpoints
from .layer import LayerData, LayerDistiller, LayerResult, StepMetrics
from .storage import ActivationStore
from .timing import PhaseTimer


def held_out_count(sequences: int) -> int:
    """Sequences kept aside to pick each layer's best state: about 1 in 16, at least 1, at most 32."""
    if sequences < 2:
        raise CalibrationError("distillation needs at least 2 calibration sequences; raise the token budget")
    return max(1, min(32, sequences // 16))


def _with_encoder_states(kwargs_for, states: torch.Tensor, device: torch.device):
    """A block's recorded arguments with the cross-attention states replaced by `states` (per batch)."""
    return lambda rows: {**kwargs_for(rows), "encoder_hidden_states": states[rows].to(device)}


def _autocast_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype | None:
    return dtype if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16) else None


OUT_OF_MEMORY_ADVICE = ("out of memory on the accelerator: lower the batch size, the sequence length or the "
                        "token budget (activations are cached per layer), or run on CPU")


def out_of_memory(emit: EventSink) -> OutOfMemoryError:
    """Release what the failed work held, report it, and return the user error to raise."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    emit(RunError(message=OUT_OF_MEMORY_ADVICE, error_type="OutOfMemoryError"))
    return OutOfMemoryError(OUT_OF_MEMORY_ADVICE)


@dataclass
class RunResult:
    student: nn.Module
    plan: RankPlan  # requested
    applied: RankPlan  # what the student really has (fewer layers if stopped)
    status: RunStatus
    layers: list[LayerFinished] = field(default_factory=list)
    seconds: float = 0.0
    tokens: int = 0


@dataclass
class Split:
    """This process's share of the calibration data, cut into training and held-out batches."""

    calibration: CalibrationData  # this process's sequences only
    batches: list[slice]  # every batch of this process over `calibration`: training, then held-out
    train: list[slice]
    held_out: list[slice]
    train_rows: list[int]  # rows of each training batch over all processes (the loss weights)


def split_calibration(calibration: CalibrationData, batch_size: int, parallel: Parallel = SINGLE) -> Split:
    """Cut the calibration sequences into training and held-out batches and keep this process's rows.

    Args:
        calibration: every calibration sequence ([n, seq]).
        batch_size: sequences per batch over all processes.
        parallel: this process's place among data-parallel processes.
    Returns:
        The split; with one process, all rows in their order.
    Raises:
        CalibrationError: fewer than 2 sequences.
        ConfigError: a batch too small to give every process a share.
    """
    n = calibration.sequences.shape[0]
    held_out = held_out_count(n)
    global_train = batch_slices(0, n - held_out, batch_size)
    global_eval = batch_slices(n - held_out, n, batch_size)
    if parallel.enabled and min(batch_size, n - held_out) < parallel.world_size:
        raise ConfigError(f"each of the {parallel.world_size} processes needs a share of every batch: "
                          f"raise the batch size ({batch_size}) and the calibration tokens")
    mine, batches, rows_per_batch = parallel.shard(global_train + global_eval)
    cut = len(global_train)
    return Split(calibration.select(mine), batches, batches[:cut], batches[cut:], rows_per_batch[:cut])


@dataclass
class Activations:
    """The inputs of the next block on both paths ([n, seq, hidden] each)."""

    teacher: torch.Tensor | None = None
    student: torch.Tensor | None = None  # None while equal to `teacher` (no block below compressed)
    student_states: torch.Tensor | None = None  # the student's encoder output, read by cross-attention


@dataclass
class Walk:
    """What the walk over blocks reads and updates: prepared once, after the inputs are captured."""

    blocks: list[Block]
    ranks_by_layer: dict[int, dict[str, int]]
    layers: list[int]  # indices of the blocks to compress, ascending
    split: Split
    steps_per_layer: int
    store: ActivationStore
    starts: dict[int, torch.Tensor]  # block index -> first input of a stack (see capture_block_inputs)
    inputs: BlockInputs
    student: nn.Module
    generator: torch.Generator
    train_start: float = field(default_factory=time.time)
    global_step: int = 0

    @property
    def steps_total(self) -> int:
        return self.steps_per_layer * len(self.layers)


class Compressor:
    """Runs the layer-local distillation of a rank plan on a loaded teacher; the teacher stays intact.

    `run` prepares (batches, held-out split, sharding, activation store, captured inputs), then walks the
    blocks bottom-up; a block in the plan is compressed by `_compress_layer` (restore or train), and
    `_advance` moves both activation paths one block up.
    """

    def __init__(self, loaded: LoadedModel, calibration: CalibrationData, plan: RankPlan, config: DistillConfig,
                 batch_size: int = 8, on_event: EventSink | None = None, stop: threading.Event | None = None,
                 seed: int = 0, checkpoints: LayerCheckpoints | None = None, parallel: Parallel = SINGLE):
        config.validate()
        self.checkpoints = checkpoints  # saved after each layer; layers already saved are restored, not retrained
        self.parallel = parallel  # this process's place among data-parallel processes (see distributed.py)
        self.loaded, self.calibration, self.plan, self.config = loaded, calibration, plan, config
        self.batch_size, self.seed = batch_size, seed
        self.on_event = on_event or (lambda event: None)
        self.stop = stop or threading.Event()
        self.device, self.dtype = loaded.device, loaded.dtype
        self.shape = ModelShape.of(loaded.model)
        self.memory = MemoryMonitor(self.device)
        self.throughput = Throughput()

    def emit(self, event: Event) -> None:
        self.on_event(event)

    def _ranks_by_layer(self, blocks: list[Block]) -> dict[int, dict[str, int]]:
        prefix = {b.index: b.name + "." for b in blocks}
        out: dict[int, dict[str, int]] = {}
        for name, rank in self.plan.ranks.items():
            layer = next(i for i, p in prefix.items() if name.startswith(p))
            out.setdefault(layer, {})[name[len(prefix[layer]):]] = rank
        return out

    def run(self) -> RunResult:
        """Distil every layer of the plan, bottom-up, into a weight-sharing copy of the teacher.

        Returns:
            RunResult: the student (a model whose compressed blocks hold LowRankLinear modules and whose other
            weights are the teacher's own tensors), the plan asked for and the plan applied (fewer layers when
            stopped), status "completed" or "stopped", one LayerFinished per layer, seconds and tokens.

        Raises:
            RankPlanError: the plan names modules this model lacks, or a checkpoint's ranks differ from it.
            ConfigError: data parallel processes without a share of every batch.
            CalibrationError: fewer than 2 calibration sequences.
            NonFiniteError: inf/NaN weights or activations (e.g. a float16 overflow), naming the layer.
            ModelForwardError: the model's own code raised; the message names the layer and model class.
            OutOfMemoryError: the accelerator ran out of memory.
        """
        start = time.time()
        try:
            with stage("distillation", model=self.loaded.model) as self.where:  # names the layer if a forward fails
                return self._run(start)
        except LillamaError as exc:
            self.emit(RunError(message=str(exc), error_type=type(exc).__name__))
            raise
        except torch.OutOfMemoryError:
            raise out_of_memory(self.emit) from None

    def _run(self, start: float) -> RunResult:
        after = summarize(self.plan, self.shape)  # validates the plan against this model before any work
        blocks = find_blocks(self.loaded.model)
        ranks_by_layer = self._ranks_by_layer(blocks)
        split = split_calibration(self.calibration, self.batch_size, self.parallel)
        layers = sorted(ranks_by_layer)
        steps_per_layer = len(split.train) * self.config.epochs if self.config.train else 0
        self.emit(RunStarted(model=self.loaded.name, device=str(self.device), layers_total=len(blocks),
                             layers_to_compress=layers, steps_total=steps_per_layer * len(layers),
                             tokens=self.calibration.tokens, params_before=after.params_before,
                             params_after=after.params_after))
        student = share_weights_copy(self.loaded.model)
        result = RunResult(student, self.plan, RankPlan({}, self.plan.strategy, self.plan.target_reduction,
                                                        self.plan.model_type), RunStatus.COMPLETED)
        result.tokens = self.calibration.tokens
        if not layers:
            return self._finish(result, start, RunStatus.COMPLETED)
        walk = self._prepare(blocks, ranks_by_layer, layers, split, steps_per_layer, student)
        try:
            status = self._walk(walk, result)
        except RunStopped:
            status = RunStatus.STOPPED
        return self._finish(result, start, status)

    def _prepare(self, blocks: list[Block], ranks_by_layer: dict[int, dict[str, int]], layers: list[int],
                 split: Split, steps_per_layer: int, student: nn.Module) -> Walk:
        """Choose where activations live and record the inputs of the first block of each stack."""
        self.memory.reset_peak()
        calibration = split.calibration
        hidden = getattr(self.loaded.model.config, "hidden_size", 0) or 0
        sequence_count, positions = calibration.sequences.shape[0], self.loaded.task.activation_positions(calibration)
        bytes_needed = 3 * sequence_count * positions * hidden * torch.finfo(self.dtype).bits // 8
        store = ActivationStore.choose(self.config.activations, self.device, bytes_needed,
                                       lillama_home() / "activations")
        self.emit(Phase(name="capture",
                        detail=f"recording the inputs of the first block; activations kept {store.describe()}"))
        starts, inputs = capture_block_inputs(self.loaded.model, blocks, calibration, split.batches, self.device,
                                              store)
        generator = torch.Generator(device="cpu").manual_seed(self.seed)
        return Walk(blocks, ranks_by_layer, layers, split, steps_per_layer, store, starts, inputs, student, generator)

    def _walk(self, walk: Walk, result: RunResult) -> RunStatus:
        """Run the blocks up to the last one in the plan; returns the run's status.

        Raises:
            RunStopped: a stop request during a layer's training.
        """
        acts = Activations()
        for block in walk.blocks[: walk.layers[-1] + 1]:
            self.where.layer = block.index
            if block.index in walk.starts:
                self._start_stack(acts, walk.starts.pop(block.index), walk, bool(result.applied.ranks))
            with resident(block.module):  # a streamed teacher block stays on the accelerator for its layer
                local_ranks = walk.ranks_by_layer.get(block.index, {})
                if not local_ranks:
                    kwargs_for, student_kwargs_for = self._kwargs(block, acts, walk)
                    teacher_y = self._teacher_outputs(block, acts.teacher, kwargs_for, walk)
                    self._advance(acts, block, teacher_y, student_kwargs_for, walk)
                    continue
                result.layers.append(self._compress_layer(block, local_ranks, acts, walk))
                for local, rank in local_ranks.items():
                    result.applied.ranks[f"{block.name}.{local}"] = rank
                self.emit(result.layers[-1])
                if self.parallel.any(self.stop.is_set(), device=self.device):  # every process stops together
                    return RunStatus.STOPPED
        return RunStatus.COMPLETED

    def _start_stack(self, acts: Activations, first_input: torch.Tensor, walk: Walk, compressed_below: bool):
        """A new stack (the decoder after the encoder) starts from the model's own inputs, the same for
        teacher and student. The student path's cross-attention reads the student's encoder states once
        encoder blocks are compressed, as the student will at inference."""
        acts.teacher, acts.student = first_input, None
        acts.student_states = self._student_encoder_states(walk.student, walk.split.calibration,
                                                           walk.split.batches, walk.store) \
            if compressed_below else None
        if acts.student_states is not None:
            acts.student = walk.store.copy(acts.teacher)

    def _kwargs(self, block: Block, acts: Activations, walk: Walk):
        """The block's recorded keyword arguments per batch: (teacher path, student path)."""
        kwargs_for = walk.inputs.kwargs_for(block.index)
        if acts.student_states is not None and walk.inputs.takes(block.index, "encoder_hidden_states"):
            return kwargs_for, _with_encoder_states(kwargs_for, acts.student_states, self.device)
        return kwargs_for, kwargs_for

    def _teacher_outputs(self, block: Block, teacher_x: torch.Tensor, kwargs_for, walk: Walk,
                         covariances: LinearCovariances | None = None) -> torch.Tensor:
        """The teacher block's outputs on the teacher path; `covariances`, if given, gather their statistics."""
        try:
            return run_block_over(block.module, teacher_x, walk.store.empty_like(teacher_x), kwargs_for,
                                  walk.split.batches, self.device, block_label(block))
        finally:
            if covariances:
                covariances.close()

    def _compress_layer(self, block: Block, local_ranks: dict[str, int], acts: Activations,
                        walk: Walk) -> LayerFinished:
        """Restore the block's student from its checkpoint or train it, install it in the student model
        and advance both paths through it.

        Returns:
            The layer's report; a trained layer's `seconds` span this whole call, split by phase in `breakdown`.
        Raises:
            RankPlanError: the checkpoint holds other ranks than the plan.
            RunStopped: a stop request during training.
        """
        start, timer = time.perf_counter(), PhaseTimer()
        kwargs_for, student_kwargs_for = self._kwargs(block, acts, walk)
        with timer.phase("checkpoint"):
            restored = self.checkpoints.restore(block.index, block.module) if self.checkpoints else None
        covariances = None
        if init_named(self.config.init).needs_covariance and restored is None:
            covariances = LinearCovariances(block.module, list(local_ranks), self.device)
        with timer.phase("teacher_targets"):
            teacher_y = self._teacher_outputs(block, acts.teacher, kwargs_for, walk, covariances)
        if covariances:  # the covariance hooks ran inside the teacher's forward
            timer.move("teacher_targets", "covariance", covariances.seconds)
        self.emit(LayerStarted(layer=block.index, position=walk.layers.index(block.index) + 1, of=len(walk.layers),
                               modules=local_ranks, steps=walk.steps_per_layer))
        if restored is not None:
            if restored[1] != local_ranks:
                raise RankPlanError(f"the checkpoint of layer {block.index} has other ranks than the plan")
            student_block, _, finished = restored
            walk.global_step += walk.steps_per_layer
            self.emit(Phase(name="resume", detail=f"layer {block.index} restored from its checkpoint"))
        else:
            data = LayerData(acts.teacher, teacher_y, acts.student, kwargs_for, student_kwargs_for)
            student_block, finished = self._train_layer(block, local_ranks, data, covariances, walk, timer)
        self.throughput.pause()
        student_block.to(self.dtype)
        set_submodule(walk.student, block.name, student_block)
        with timer.phase("advance"):
            self._advance(acts, block, teacher_y, student_kwargs_for, walk, student_block)
        if restored is not None:
            return finished  # the report of the run that trained it
        if self.checkpoints and self.parallel.is_main:
            with timer.phase("checkpoint"):  # the saved report's times stop short of its own saving
                self.checkpoints.save(block.index, student_block, local_ranks, self._timed(finished, start, timer))
        return self._timed(finished, start, timer)

    @staticmethod
    def _timed(finished: LayerFinished, start: float, timer: PhaseTimer) -> LayerFinished:
        return dataclasses.replace(finished, seconds=time.perf_counter() - start,
                                   breakdown={k: round(v, 6) for k, v in timer.seconds.items()})

    def _train_layer(self, block: Block, local_ranks: dict[str, int], data: LayerData,
                     covariances: LinearCovariances | None, walk: Walk,
                     timer: PhaseTimer) -> tuple[nn.Module, LayerFinished]:
        """Factorise the block's planned linears and distil them on `data` (float32 student, not installed).
        The report's seconds and breakdown are left for `_compress_layer` to fill in; `timer` gets the phases.

        Raises:
            NonFiniteError: the teacher's weights are not finite.
            RunStopped: a stop request during training.
        """
        with timer.phase("covariance"):
            means = covariances.means(self.parallel) if covariances else None
        with timer.phase("factorisation"):
            require_finite_weights(block.module, list(local_ranks), block_label(block), self.dtype)
            student_block = self._student_block(block.module, local_ranks, means, walk.generator)
            split = walk.split
            distiller = LayerDistiller(student_block, data, self.config, self.device, split.train, split.held_out,
                                       _autocast_dtype(self.device, self.dtype), self.parallel, split.train_rows,
                                       timer)

        def on_step(m: StepMetrics):
            walk.global_step += 1
            self._emit_step(block.index, m, walk)

        if self.config.train:
            layer_result = distiller.train(on_step, self.stop.is_set)
        else:
            with timer.phase("held_out"):
                loss = distiller.held_out_loss()
            layer_result = LayerResult(loss, loss, 0, float("nan"), float("nan"), 0)
        finished = self._layer_report(block, local_ranks, layer_result, unreached_experts(means) if means else 0)
        return student_block, finished

    def _advance(self, acts: Activations, block: Block, teacher_y: torch.Tensor, student_kwargs_for, walk: Walk,
                 student_block: nn.Module | None = None) -> None:
        """Move both paths one block up: the teacher's to `teacher_y`, the student's through `student_block`
        (None: the block is not compressed, so the student path runs the teacher's block, if it differs)."""
        batches, label = walk.split.batches, block_label(block)
        if student_block is None:
            if acts.student is not None:
                run_block_over(block.module, acts.student, acts.student, student_kwargs_for, batches, self.device,
                               f"{label} on the student's inputs")
        else:
            source = acts.student if acts.student is not None else acts.teacher
            out = source if acts.student is not None else walk.store.empty_like(source)
            acts.student = run_block_over(student_block, source, out, student_kwargs_for, batches, self.device,
                                          f"the student of {label}")
            if is_streamed(block.module):  # the finished student block joins the teacher's in host memory
                stream_block(student_block, self.device)
        acts.teacher = teacher_y

    @torch.no_grad()
    def _student_encoder_states(self, student: nn.Module, calibration: CalibrationData, batches: list[slice],
                                store: ActivationStore) -> torch.Tensor | None:
        """The student's encoder output for every calibration row, where the task's models have an encoder."""
        return self.loaded.task.student_encoder_states(student, calibration, batches, store, self.device, self.dtype)

    def _layer_report(self, block: Block, local_ranks: dict[str, int], r: LayerResult, unreached: int):
        summary = summarize(RankPlan({f"{block.name}.{k}": rank for k, rank in local_ranks.items()}), self.shape)
        row = summary.layers[block.index]
        return LayerFinished(layer=block.index, init_loss=r.init_loss, best_loss=r.best_loss,
                             final_loss_teacher_input=r.final_loss_teacher_input,
                             final_loss_student_input=r.final_loss_student_input, best_step=r.best_step,
                             seconds=0.0, params_before=row["params_before"], params_after=row["params_after"],
                             skipped_steps=r.skipped_steps, unreached_experts=unreached)

    def _student_block(self, teacher_block: nn.Module, local_ranks: dict[str, int],
                       covariances: dict[str, Covariance] | None, generator: torch.Generator) -> nn.Module:
        """A float32 copy of the block with the chosen linears replaced by initialised low-rank ones."""
        block = copy.deepcopy(teacher_block).float()
        with serial_on_cpu(next(block.parameters()).device):  # float64 LAPACK: see serial_on_cpu
            for local, rank in local_ranks.items():
                dense = block.get_submodule(local)
                cov = covariances.get(local) if covariances else None
                set_submodule(block, local, to_low_rank(dense, rank, self.config.init, cov, generator))
        return block

    def _emit_step(self, layer: int, m: StepMetrics, walk: Walk):
        rate = self.throughput.update(m.tokens)
        elapsed = time.time() - walk.train_start
        mem = self.memory.sample()
        self.emit(Step(layer=layer, step=m.step, steps=m.steps, global_step=walk.global_step,
                       steps_total=walk.steps_total, loss_teacher_input=m.loss_teacher_input,
                       loss_student_input=m.loss_student_input, lr=m.lr, tokens_per_s=rate, elapsed_s=elapsed,
                       eta_s=eta_seconds(elapsed, walk.global_step, walk.steps_total), vram_used_bytes=mem.used_bytes,
                       vram_total_bytes=mem.total_bytes, torch_peak_allocated_bytes=mem.peak_allocated_bytes,
                       torch_peak_reserved_bytes=mem.peak_reserved_bytes, skipped=m.skipped, rss_bytes=mem.rss_bytes))

    def _finish(self, result: RunResult, start: float, status: RunStatus) -> RunResult:
        result.status = status
        result.seconds = time.time() - start
        done = result.applied.layers(self.shape)
        message = "" if status == RunStatus.COMPLETED else f"stopped by request; {len(done)} finished layer(s) kept"
        self.emit(RunFinished(status=status, layers_done=done, seconds=result.seconds, tokens=result.tokens,
                              message=message))
        return result

