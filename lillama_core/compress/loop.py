"""A whole compression run: plan -> capture block inputs -> layer by layer -> student model.

Only one block is trained at a time, with its own optimiser, on activations cached for that block
alone; layers above the last compressed one are never touched, so a bottom-first run needs little
memory. Progress leaves as events; a stop request ends the run within one optimiser step and the
layers finished so far stay in the student.
"""

from __future__ import annotations

import copy
import threading
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import DistillConfig
from ..data.calibration import CalibrationData
from ..errors import CalibrationError, ConfigError, LillamaError, OutOfMemoryError, RankPlanError, RunStopped
from ..events import Event, EventSink, LayerFinished, LayerStarted, Phase, RunError, RunFinished, RunStarted, Step
from ..factorize.svd import to_low_rank
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
from .capture import InputCovariances, block_label, capture_block_inputs, run_block_over, unreached_experts
from .checkpoints import LayerCheckpoints
from .layer import LayerData, LayerDistiller, LayerResult, StepMetrics
from .storage import ActivationStore


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
    emit(RunError(OUT_OF_MEMORY_ADVICE, "OutOfMemoryError"))
    return OutOfMemoryError(OUT_OF_MEMORY_ADVICE)


@dataclass
class RunResult:
    student: nn.Module
    plan: RankPlan  # requested
    applied: RankPlan  # what the student really has (fewer layers if stopped)
    status: str
    layers: list[LayerFinished] = field(default_factory=list)
    seconds: float = 0.0
    tokens: int = 0








class Compressor:
    """Runs the layer-local distillation of a rank plan on a loaded teacher; the teacher stays intact."""

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
        start = time.time()
        try:
            with stage("distillation", model=self.loaded.model) as self.where:  # names the layer if a forward fails
                return self._run(start)
        except LillamaError as exc:
            self.emit(RunError(str(exc), type(exc).__name__))
            raise
        except torch.OutOfMemoryError:
            raise out_of_memory(self.emit) from None

    def _run(self, start: float) -> RunResult:
        summarize(self.plan, self.shape)  # validates the plan against this model before any work
        blocks = find_blocks(self.loaded.model)
        ranks_by_layer = self._ranks_by_layer(blocks)
        n = self.calibration.sequences.shape[0]
        held_out = held_out_count(n)
        global_train = batch_slices(0, n - held_out, self.batch_size)
        global_eval = batch_slices(n - held_out, n, self.batch_size)
        if self.parallel.enabled and min(self.batch_size, n - held_out) < self.parallel.world_size:
            raise ConfigError(f"each of the {self.parallel.world_size} processes needs a share of every batch: "
                              f"raise the batch size ({self.batch_size}) and the calibration tokens")
        # This process's rows of every batch; with one process, all of them in their order.
        mine, batches, rows_per_batch = self.parallel.shard(global_train + global_eval)
        calibration = self.calibration.select(mine)
        train_batches, eval_batches = batches[:len(global_train)], batches[len(global_train):]
        steps_per_layer = len(train_batches) * self.config.epochs
        if not self.config.distill:
            steps_per_layer = 0
        layers = sorted(ranks_by_layer)
        steps_total = steps_per_layer * len(layers)
        after = summarize(self.plan, self.shape)
        self.emit(RunStarted(self.loaded.name, str(self.device), len(blocks), layers, steps_total,
                             self.calibration.tokens, after.params_before, after.params_after))
        student = share_weights_copy(self.loaded.model)
        result = RunResult(student, self.plan, RankPlan({}, self.plan.strategy, self.plan.target_reduction,
                                                        self.plan.model_type), "completed")
        result.tokens = self.calibration.tokens
        if not layers:
            return self._finish(result, start, "completed")

        self.memory.reset_peak()
        hidden = getattr(self.loaded.model.config, "hidden_size", 0) or 0
        sequence_count, positions = calibration.sequences.shape[0], self.loaded.task.activation_positions(calibration)
        bytes_needed = 3 * sequence_count * positions * hidden * torch.finfo(self.dtype).bits // 8
        store = ActivationStore.choose(self.config.activations, self.device, bytes_needed,
                                       lillama_home() / "activations")
        self.emit(Phase("capture", f"recording the inputs of the first block; activations kept {store.describe()}"))
        starts, inputs = capture_block_inputs(self.loaded.model, blocks, calibration, batches, self.device, store)
        teacher_x = student_x = student_states = None
        generator = torch.Generator(device="cpu").manual_seed(self.seed)
        global_step = 0
        train_start = time.time()

        for block in blocks[: layers[-1] + 1]:
            self.where.layer = block.index
            if block.index in starts:
                # A new stack (the decoder after the encoder) starts from the model's own inputs, the same
                # for teacher and student. The student path's cross-attention reads the student's encoder
                # states once encoder blocks are compressed, as the student will at inference.
                teacher_x, student_x = starts.pop(block.index), None  # student_x: None while equal to teacher_x
                student_states = self._student_encoder_states(student, calibration, batches, store) \
                    if result.applied.ranks else None
                if student_states is not None:
                    student_x = store.copy(teacher_x)
            with resident(block.module):  # a streamed teacher block stays on the accelerator for its layer
                kwargs_for = student_kwargs_for = inputs.kwargs_for(block.index)
                if student_states is not None and inputs.takes(block.index, "encoder_hidden_states"):
                    student_kwargs_for = _with_encoder_states(kwargs_for, student_states, self.device)
                local_ranks = ranks_by_layer.get(block.index, {})
                restored = None
                if local_ranks and self.checkpoints:
                    restored = self.checkpoints.restore(block.index, block.module)
                covariances = None
                if local_ranks and self.config.init == "whitened" and restored is None:
                    covariances = InputCovariances(block.module, list(local_ranks), self.device)
                try:
                    teacher_y = run_block_over(block.module, teacher_x, store.empty_like(teacher_x), kwargs_for,
                                               batches, self.device, block_label(block))
                finally:
                    if covariances:
                        covariances.close()
                if not local_ranks:
                    if student_x is not None:
                        run_block_over(block.module, student_x, student_x, student_kwargs_for, batches, self.device,
                                       f"{block_label(block)} on the student's inputs")
                    teacher_x = teacher_y
                    continue

                position = layers.index(block.index) + 1
                self.emit(LayerStarted(block.index, position, len(layers), local_ranks, steps_per_layer))
                layer_start = time.time()
                if restored is not None:
                    if restored[1] != local_ranks:
                        raise RankPlanError(f"the checkpoint of layer {block.index} has other ranks than the plan")
                    student_block, _, finished = restored
                    global_step += steps_per_layer
                    self.emit(Phase("resume", f"layer {block.index} restored from its checkpoint"))
                else:
                    require_finite_weights(block.module, list(local_ranks), block_label(block), self.dtype)
                    means = covariances.means(self.parallel) if covariances else None
                    student_block = self._student_block(block.module, local_ranks, means, generator)
                    data = LayerData(teacher_x, teacher_y, student_x, kwargs_for, student_kwargs_for)
                    distiller = LayerDistiller(student_block, data, self.config, self.device, train_batches,
                                               eval_batches, _autocast_dtype(self.device, self.dtype), self.parallel,
                                               rows_per_batch[:len(global_train)])

                    def on_step(m: StepMetrics, layer=block.index):
                        nonlocal global_step
                        global_step += 1
                        self._emit_step(layer, m, global_step, steps_total, train_start)

                    try:
                        if self.config.distill:
                            layer_result = distiller.train(on_step, self.stop.is_set)
                        else:
                            loss = distiller.held_out_loss()
                            layer_result = LayerResult(loss, loss, 0, float("nan"), float("nan"), 0)
                    except RunStopped:
                        return self._finish(result, start, "stopped")
                    finished = self._layer_report(block, local_ranks, layer_result, time.time() - layer_start,
                                                  unreached_experts(means) if means else 0)
                self.throughput.pause()
                student_block.to(self.dtype)
                set_submodule(student, block.name, student_block)
                source = student_x if student_x is not None else teacher_x
                student_x = run_block_over(student_block, source,
                                           source if student_x is not None else store.empty_like(source),
                                           student_kwargs_for, batches, self.device,
                                           f"the student of {block_label(block)}")
                if is_streamed(block.module):  # the finished student block joins the teacher's in host memory
                    stream_block(student_block, self.device)
                teacher_x = teacher_y
                for local, rank in local_ranks.items():
                    result.applied.ranks[f"{block.name}.{local}"] = rank
                if self.checkpoints and restored is None and self.parallel.is_main:
                    self.checkpoints.save(block.index, student_block, local_ranks, finished)
                result.layers.append(finished)
                self.emit(finished)
                if self.parallel.any(self.stop.is_set(), device=self.device):  # every process stops together
                    return self._finish(result, start, "stopped")
        return self._finish(result, start, "completed")

    @torch.no_grad()
    def _student_encoder_states(self, student: nn.Module, calibration: CalibrationData, batches: list[slice],
                                store: ActivationStore) -> torch.Tensor | None:
        """The student's encoder output for every calibration row, where the task's models have an encoder."""
        return self.loaded.task.student_encoder_states(student, calibration, batches, store, self.device, self.dtype)

    def _layer_report(self, block: Block, local_ranks: dict[str, int], r: LayerResult, seconds: float,
                      unreached: int):
        summary = summarize(RankPlan({f"{block.name}.{k}": rank for k, rank in local_ranks.items()}), self.shape)
        row = summary.layers[block.index]
        return LayerFinished(block.index, r.init_loss, r.best_loss, r.final_loss_teacher_input,
                             r.final_loss_student_input, r.best_step, seconds, row["params_before"],
                             row["params_after"], r.skipped_steps, unreached)

    def _student_block(self, teacher_block: nn.Module, local_ranks: dict[str, int],
                       covariances: dict[str, torch.Tensor] | None, generator: torch.Generator) -> nn.Module:
        """A float32 copy of the block with the chosen linears replaced by initialised low-rank ones."""
        block = copy.deepcopy(teacher_block).float()
        for local, rank in local_ranks.items():
            dense = block.get_submodule(local)
            cov = covariances.get(local) if covariances else None
            set_submodule(block, local, to_low_rank(dense, rank, self.config.init, cov, generator))
        return block

    def _emit_step(self, layer: int, m: StepMetrics, global_step: int, steps_total: int, train_start: float):
        rate = self.throughput.update(m.tokens)
        elapsed = time.time() - train_start
        mem = self.memory.sample()
        self.emit(Step(layer, m.step, m.steps, global_step, steps_total, m.loss_teacher_input,
                       m.loss_student_input, m.lr, rate, elapsed, eta_seconds(elapsed, global_step, steps_total),
                       mem.used_bytes, mem.total_bytes, mem.peak_allocated_bytes, mem.peak_reserved_bytes,
                       m.skipped, rss_bytes=mem.rss_bytes))

    def _finish(self, result: RunResult, start: float, status: str) -> RunResult:
        result.status = status
        result.seconds = time.time() - start
        done = result.applied.layers(self.shape)
        message = "" if status == "completed" else f"stopped by request; {len(done)} finished layer(s) kept"
        self.emit(RunFinished(status, done, result.seconds, result.tokens, message))
        return result

