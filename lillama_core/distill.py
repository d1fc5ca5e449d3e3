"""Layer-local Teacher+Student distillation of one block.

The student block (the teacher block with low-rank linears) is trained to reproduce the teacher
block's outputs, fed two ways: the teacher's own inputs, and the inputs the already-compressed
layers below produce. The first keeps each layer faithful on its own; the second teaches it to
correct the error accumulated below it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import DistillConfig
from .errors import RunStopped


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
    kwargs_for: Callable[[int], dict]  # block keyword arguments (masks, rotary) for a batch size


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


def run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def batch_slices(start: int, stop: int, batch_size: int) -> list[slice]:
    return [slice(i, min(i + batch_size, stop)) for i in range(start, stop, batch_size)]


def lr_at(step: int, steps: int, lr: float, warmup_steps: int, schedule: str) -> float:
    """Linear warm-up, then constant or cosine decay to a tenth of the peak."""
    if step < warmup_steps:
        return lr * (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return lr
    progress = (step - warmup_steps) / max(steps - warmup_steps, 1)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


class LayerDistiller:
    """Trains the low-rank factors of one student block; everything else in the block stays frozen."""

    def __init__(self, student: nn.Module, data: LayerData, config: DistillConfig, device: torch.device,
                 train_batches: list[slice], eval_batches: list[slice], autocast_dtype: torch.dtype | None):
        self.student, self.data, self.config, self.device = student, data, config, device
        self.train_batches, self.eval_batches = train_batches, eval_batches
        self.autocast_dtype = autocast_dtype
        self.factors = [p for name, p in student.named_parameters() if name.endswith(("A.weight", "B.weight"))]
        for p in student.parameters():
            p.requires_grad_(False)
        for p in self.factors:
            p.requires_grad_(True)

    @property
    def steps(self) -> int:
        return len(self.train_batches) * self.config.epochs

    def _fetch(self, tensor: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
        return None if tensor is None else tensor[rows].to(self.device, non_blocking=True)

    def _losses(self, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss on teacher inputs, loss on student inputs); the second equals the first while the
        inputs have not diverged, and a path the config leaves out is not computed."""
        target = self._fetch(self.data.teacher_out, rows)
        kwargs = self.data.kwargs_for(rows.stop - rows.start)
        wanted = {"joint": ("teacher", "student"), "teacher": ("teacher",), "student": ("student",)}[self.config.loss]
        student_in = self._fetch(self.data.student_in, rows)
        losses = {}
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            if "teacher" in wanted or student_in is None:
                teacher_in = self._fetch(self.data.teacher_in, rows)
                losses["teacher"] = feature_loss(run_block(self.student, teacher_in, kwargs), target)
            if "student" in wanted and student_in is not None:
                losses["student"] = feature_loss(run_block(self.student, student_in, kwargs), target)
        teacher_loss = losses.get("teacher", losses.get("student"))
        return teacher_loss, losses.get("student", teacher_loss)

    def _objective(self, loss_t: torch.Tensor, loss_s: torch.Tensor) -> torch.Tensor:
        if self.config.loss == "joint":
            return loss_t + loss_s if loss_s is not loss_t else 2 * loss_t
        return loss_t if self.config.loss == "teacher" else loss_s

    @torch.no_grad()
    def held_out_loss(self) -> float:
        total = 0.0
        for rows in self.eval_batches:
            loss_t, loss_s = self._losses(rows)
            paths = 2 if self.config.loss == "joint" else 1  # report a per-path mean, comparable to step losses
            total += self._objective(loss_t, loss_s).item() / paths * (rows.stop - rows.start)
        count = sum(r.stop - r.start for r in self.eval_batches)
        return total / max(count, 1)

    def _snapshot(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.factors]

    def _restore(self, snapshot: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for p, saved in zip(self.factors, snapshot):
                p.copy_(saved)

    def train(self, on_step: Callable[[StepMetrics], None], should_stop: Callable[[], bool]) -> LayerResult:
        config = self.config
        optimizer = torch.optim.AdamW(self.factors, lr=config.lr, weight_decay=config.weight_decay)
        init_loss = best_loss = self.held_out_loss()
        best_state, best_step = self._snapshot() if config.keep_best else None, 0
        step, skipped = 0, 0
        loss_t = loss_s = torch.tensor(float("nan"))
        self.student.train()
        for _ in range(config.epochs):
            for rows in self.train_batches:
                lr = lr_at(step, self.steps, config.lr, config.warmup_steps, config.schedule)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss_t, loss_s = self._losses(rows)
                objective = self._objective(loss_t, loss_s)
                finite = bool(torch.isfinite(objective))
                optimizer.zero_grad(set_to_none=True)
                if finite:
                    objective.backward()
                    if config.grad_clip:
                        torch.nn.utils.clip_grad_norm_(self.factors, config.grad_clip)
                    optimizer.step()
                else:
                    skipped += 1
                step += 1
                on_step(StepMetrics(step, self.steps, loss_t.item(), loss_s.item(), lr,
                                    (rows.stop - rows.start) * self.data.teacher_in.shape[1], not finite))
                if should_stop():
                    raise RunStopped("stopped by request")
                if config.keep_best and (step % config.eval_every == 0 or step == self.steps):
                    current = self.held_out_loss()
                    if current < best_loss:
                        best_loss, best_state, best_step = current, self._snapshot(), step
        self.student.eval()
        if config.keep_best:
            self._restore(best_state)
        else:
            best_loss = self.held_out_loss()
            best_step = step
        for p in self.factors:
            p.requires_grad_(False)
        return LayerResult(init_loss, best_loss, best_step, loss_t.item(), loss_s.item(), skipped)
