"""Layer-local Teacher+Student distillation of one block.

The student block (the teacher block with low-rank linears) is trained to reproduce the teacher
block's outputs, fed two ways: the teacher's own inputs, and the inputs the already-compressed
layers below produce. The first keeps each layer faithful on its own; the second teaches it to
correct the error accumulated below it.

The student runs in eval mode throughout, in training steps as in held-out checks: dropout and MoE
router jitter stay off. The teacher's targets were recorded in eval mode, so the student fits that
deterministic function; with dropout on, the held-out loss measured noise (a tiny Llama with attention
dropout 0.5 never beat its initial state, and keep-best discarded all training).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import DistillConfig
from ..errors import RunStopped
from ..runtime.distributed import SINGLE, Parallel
from .batching import join_batches, run_block
from .schedule import lr_at
from .timing import PhaseTimer


def feature_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error minus log sigmoid of the cosine similarity along the hidden dimension."""
    prediction, target = prediction.float(), target.float()
    cosine = F.cosine_similarity(prediction, target, dim=-1)
    return (prediction - target).abs().mean() - F.logsigmoid(cosine).mean()


@dataclass
class LayerData:
    """Activations of one block for every calibration sequence ([n, seq, hidden] each)."""

    teacher_in: torch.Tensor
    teacher_out: torch.Tensor
    student_in: torch.Tensor | None  # None while no layer below is compressed: same as teacher_in
    kwargs_for: Callable[[slice], dict]  # block keyword arguments (masks, rotary, cross-attention) for a batch
    student_kwargs_for: Callable[[slice], dict] | None = None  # the student path's, where they differ


@dataclass
class StepMetrics:
    step: int
    steps: int
    loss_teacher_input: float
    loss_student_input: float
    lr: float
    tokens: int
    skipped: bool


@dataclass
class LayerResult:
    init_loss: float
    best_loss: float
    best_step: int
    final_loss_teacher_input: float
    final_loss_student_input: float
    skipped_steps: int


# A held-out check runs its rows forward on each path; an optimiser step runs its rows forward and backward,
# about three forwards' work (Kaplan et al. 2020), on the same paths.
STEP_FORWARDS = 3


def check_interval(steps: int, held_out_rows: int, batch_rows: float, share: float) -> int:
    """Optimiser steps between held-out checks so that all of a layer's checks, the initial one included, cost
    about `share` of its optimiser steps' work; never fewer than one check after training (on the last step).

    Args:
        steps: the layer's optimiser steps.
        held_out_rows: held-out sequences (all processes'); a check runs each once per path.
        batch_rows: sequences per training batch (all processes').
        share: DistillConfig.held_out_share.
    """
    check_cost = max(held_out_rows, 1) / (STEP_FORWARDS * max(batch_rows, 1))  # in optimiser steps
    after_initial = max(1, int(share * steps / check_cost) - 1)
    return max(1, -(-steps // after_initial))


def _rows(batch: slice) -> int:
    return batch.stop - batch.start


def _cast_floats(value, dtype: torch.dtype):
    """`value` with its floating-point tensors (also inside dicts, tuples and lists) cast to `dtype`."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, dict):
        return {key: _cast_floats(item, dtype) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_cast_floats(item, dtype) for item in value)
    return value


class LayerDistiller:
    """Trains the low-rank factors of one student block; everything else in the block stays frozen.

    Under data parallelism the batches are this process's parts of the global batches, `train_rows`
    the global row count of each, and every step's gradient is summed over processes."""

    def __init__(self, student: nn.Module, data: LayerData, config: DistillConfig, device: torch.device,
                 train_batches: list[slice], eval_batches: list[slice], autocast_dtype: torch.dtype | None,
                 parallel: Parallel = SINGLE, train_rows: list[int] | None = None, timer: PhaseTimer | None = None):
        self.timer = timer or PhaseTimer()  # train_steps, step_events and held_out seconds of `train`
        self.student, self.data, self.config, self.device = student, data, config, device
        self.train_batches, self.eval_batches = train_batches, eval_batches
        self.train_rows = train_rows or [_rows(b) for b in train_batches]
        self.autocast_dtype = autocast_dtype
        # Without autocast (the CPU) the float32 student would get a bf16 teacher's activations, masks and
        # cross-attention states as they were recorded; casting them up is what autocast does on a GPU.
        self.input_dtype = None if autocast_dtype is not None else next(student.parameters()).dtype
        self.parallel = parallel
        student.eval()  # in training steps as in held-out checks: see the module docstring
        self.factors = [p for name, p in student.named_parameters() if name.endswith(("A.weight", "B.weight"))]
        for p in student.parameters():
            p.requires_grad_(False)
        for p in self.factors:
            p.requires_grad_(True)
        parallel.broadcast_(self.factors)  # identical starting factors, whatever each process's SVD gave
        held_out_rows, = parallel.sum_values(sum(_rows(b) for b in eval_batches), device=device)
        self.check_every = config.eval_every or check_interval(
            self.steps, int(held_out_rows), sum(self.train_rows) / max(len(self.train_rows), 1), config.held_out_share)

    @property
    def steps(self) -> int:
        return len(self.train_batches) * self.config.epochs

    def _compute_form(self, value):
        return value if self.input_dtype is None else _cast_floats(value, self.input_dtype)

    def _fetch(self, tensor: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
        return None if tensor is None else self._compute_form(tensor[rows].to(self.device, non_blocking=True))

    def _losses(self, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss on teacher inputs, loss on student inputs); the second equals the first while the
        inputs have not diverged, and a path the config leaves out is not computed. The joint loss runs
        both paths as one forward over the two batches stacked, where their block arguments allow it."""
        target = self._fetch(self.data.teacher_out, rows)
        kwargs = self._compute_form(self.data.kwargs_for(rows))
        student_in = self._fetch(self.data.student_in, rows)
        teacher_path = self.config.loss != "student" or student_in is None
        student_path = self.config.loss != "teacher" and student_in is not None
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            teacher_in = self._fetch(self.data.teacher_in, rows) if teacher_path else None
            student_kwargs = (self._compute_form(self.data.student_kwargs_for(rows)) if self.data.student_kwargs_for
                              else kwargs) if student_path else None
            both = join_batches(kwargs, student_kwargs, _rows(rows)) if teacher_path and student_path else None
            if both is not None:  # the block treats samples independently, so this is the two forwards' maths
                out_t, out_s = run_block(self.student, torch.cat([teacher_in, student_in]), both).chunk(2)
            else:
                out_t = run_block(self.student, teacher_in, kwargs) if teacher_path else None
                out_s = run_block(self.student, student_in, student_kwargs) if student_path else None
            loss_t = feature_loss(out_t, target) if teacher_path else None
            loss_s = feature_loss(out_s, target) if student_path else None
        return (loss_t if loss_t is not None else loss_s), (loss_s if loss_s is not None else loss_t)

    def _objective(self, loss_t: torch.Tensor, loss_s: torch.Tensor) -> torch.Tensor:
        if self.config.loss == "joint":
            return loss_t + loss_s if loss_s is not loss_t else 2 * loss_t
        return loss_t if self.config.loss == "teacher" else loss_s

    @torch.no_grad()
    def held_out_loss(self) -> float:
        total, count = 0.0, 0
        for rows in self.eval_batches:
            if _rows(rows):
                loss_t, loss_s = self._losses(rows)
                paths = 2 if self.config.loss == "joint" else 1  # a per-path mean, comparable to step losses
                total += self._objective(loss_t, loss_s).item() / paths * _rows(rows)
                count += _rows(rows)
        total, count = self.parallel.sum_values(total, count, device=self.device)
        return total / max(count, 1)

    def _sum_gradients(self) -> None:
        """All-reduce the factor gradients as one flat tensor (one collective per step)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.factors]
        flat = self.parallel.all_reduce(torch.cat([g.reshape(-1) for g in grads]))
        for p, chunk in zip(self.factors, flat.split([g.numel() for g in grads]), strict=True):
            p.grad = chunk.view_as(p)

    def _snapshot(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.factors]

    def _restore(self, snapshot: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for p, saved in zip(self.factors, snapshot, strict=True):
                p.copy_(saved)

    def train(self, on_step: Callable[[StepMetrics], None], should_stop: Callable[[], bool]) -> LayerResult:
        """One AdamW run over the training batches (`config.epochs` passes), on the joint loss or one path.

        Args:
            on_step: called after every optimiser step with its losses (per-path means), learning rate and tokens.
            should_stop: polled after every step; True (on any process) ends the layer.

        Returns:
            LayerResult: held-out loss before training and of the state kept (the best one with keep_best), the
            step it came from, the last step's losses and how many steps were skipped for a non-finite loss.

        Raises:
            RunStopped: a stop was requested; the block's factors are left as they were at that step.
        """
        config, timer = self.config, self.timer
        optimizer = torch.optim.AdamW(self.factors, lr=config.lr, weight_decay=config.weight_decay)
        best = self._first_best()
        init_loss = best[0]
        step, skipped = 0, 0
        sum_t = sum_s = float("nan")
        total_rows = 1
        for _ in range(config.epochs):
            for rows, total_rows in zip(self.train_batches, self.train_rows, strict=True):
                with timer.phase("train_steps"):
                    sum_t, sum_s, finite, lr = self._step(optimizer, step, rows, total_rows)
                skipped += not finite
                step += 1
                with timer.phase("step_events"):
                    on_step(StepMetrics(step, self.steps, sum_t / total_rows, sum_s / total_rows, lr,
                                        total_rows * self.data.teacher_in.shape[1], not finite))
                    if self.parallel.any(should_stop(), device=self.device):
                        raise RunStopped("stopped by request")
                if config.keep_best and (step % self.check_every == 0 or step == self.steps):
                    best = self._better(best, step)
        best_loss, best_step = self._kept(best, step)
        for p in self.factors:
            p.requires_grad_(False)
        return LayerResult(init_loss, best_loss, best_step, sum_t / total_rows, sum_s / total_rows, skipped)

    def _first_best(self) -> tuple[float, list[torch.Tensor] | None, int]:
        """(held-out loss, factors to keep, step) of the initialised factors."""
        with self.timer.phase("held_out"):
            return self.held_out_loss(), self._snapshot() if self.config.keep_best else None, 0

    def _better(self, best: tuple, step: int) -> tuple:
        """`best`, or the factors now when their held-out loss is lower."""
        with self.timer.phase("held_out"):
            current = self.held_out_loss()
            return (current, self._snapshot(), step) if current < best[0] else best

    def _kept(self, best: tuple, step: int) -> tuple[float, int]:
        """(held-out loss, step) of the state the layer ends with: the best one with keep_best, else the last."""
        with self.timer.phase("held_out"):
            if self.config.keep_best:
                self._restore(best[1])
                return best[0], best[2]
            return self.held_out_loss(), step

    def _step(self, optimizer: torch.optim.Optimizer, step: int, rows: slice, total_rows: int,
              ) -> tuple[float, float, bool, float]:
        """One optimiser step on a batch; returns (sum of teacher-input losses over all processes' rows, the same
        for student inputs, whether the step was applied (finite loss), learning rate)."""
        config = self.config
        lr = lr_at(step, self.steps, config.lr, config.warmup_steps, config.schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        here = _rows(rows)
        loss_t = loss_s = objective = torch.zeros((), device=self.device)
        if here:
            loss_t, loss_s = self._losses(rows)
            objective = self._objective(loss_t, loss_s)
        # Every process must agree on the step's mean losses and on skipping it.
        sum_t, sum_s, bad = self.parallel.sum_values(
            loss_t.item() * here, loss_s.item() * here, float(not torch.isfinite(objective)), device=self.device)
        finite = bad == 0
        optimizer.zero_grad(set_to_none=True)
        if finite:
            if here:
                (objective * (here / total_rows)).backward()
            if self.parallel.enabled:
                self._sum_gradients()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.factors, config.grad_clip)
            optimizer.step()
        return sum_t, sum_s, finite, lr
