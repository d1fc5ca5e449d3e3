"""Global healing: a short end-to-end stage after the layer-local distillation.

Layer-local training cannot see how small errors compound across layers; at high compression
that compounding dominates. Healing trains only the low-rank factors so the student's next-token
distribution matches the teacher's (KL on logits), with the teacher's logits computed batch by
batch (never stored), gradient checkpointing, and a token budget.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..config import HealConfig
from ..data.calibration import CalibrationData
from ..errors import RunStopped
from ..events import WHOLE_MODEL, EventSink, Phase, Step, StepStage
from ..modeling.shipped import LowRankLinear
from ..runtime.telemetry import MemoryMonitor, Throughput, eta_seconds
from .batching import batch_slices
from .schedule import lr_at


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) per token, averaged; both softened by the same temperature."""
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return F.kl_div(student.flatten(0, -2), teacher.flatten(0, -2), log_target=True, reduction="batchmean") \
        * temperature**2


def factor_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, LowRankLinear) for p in (m.A.weight, m.B.weight)]


def heal(student: nn.Module, teacher: nn.Module, calibration: CalibrationData, config: HealConfig,
         on_event: EventSink | None = None, stop: threading.Event | None = None) -> dict:
    """Train the student's low-rank factors on KL to the teacher; returns before/after held-out KL.

    Raises:
        RunStopped: a stop was requested; the distilled factors are put back.
    """
    config.validate()
    emit = on_event or (lambda event: None)
    factors = factor_parameters(student)
    if not factors:
        return {"heal_steps": 0}
    n, seq_len = calibration.sequences.shape
    held_out = slice(n - max(1, min(8, n // 10)), n)
    train_rows = min(held_out.start, max(1, config.tokens // seq_len))
    train_batches = batch_slices(0, train_rows, config.batch_size)

    @torch.no_grad()
    def held_out_kl() -> float:
        student.eval()
        inputs = calibration.model_inputs(held_out, next(student.parameters()).device)
        return kl_to_teacher(student(**inputs).logits, teacher(**inputs).logits).item()

    before = held_out_kl()
    initial = [p.detach().clone() for p in factors]
    emit(Phase(name="heal", detail=f"end-to-end healing on {train_rows * seq_len:,} tokens; held-out KL {before:.4f}"))
    start = time.time()
    try:
        with _training(student, factors, config.gradient_checkpointing):
            _train(student, teacher, calibration, config, factors, train_batches, emit, stop or threading.Event())
    except RunStopped:
        _restore(factors, initial)  # a half-healed student is not worth keeping over the distilled one
        raise
    after = held_out_kl()
    if not after <= before:  # healing must never leave the student worse than it found it
        _restore(factors, initial)
        emit(Phase(name="heal", detail=f"held-out KL rose {before:.4f} -> {after:.4f}; kept the distilled factors"))
        after = before
    else:
        emit(Phase(name="heal", detail=f"held-out KL {before:.4f} -> {after:.4f}"))
    return {"heal_steps": len(train_batches), "heal_tokens": train_rows * seq_len, "heal_kl_before": before,
            "heal_kl_after": after, "heal_seconds": time.time() - start}


@contextmanager
def _training(student: nn.Module, factors: list[nn.Parameter], gradient_checkpointing: bool):
    """Only the factors learn, with dropout off and activation checkpointing if asked; all undone on the way out."""
    for p in student.parameters():
        p.requires_grad_(False)
    for p in factors:
        p.requires_grad_(True)
    # transformers 5.24 renamed gradient_* to activation_checkpointing_*; older 5.x only has the first.
    prefix = "activation" if hasattr(student, "activation_checkpointing_enable") else "gradient"
    checkpointing = hasattr(student, f"{prefix}_checkpointing_enable") and gradient_checkpointing
    if checkpointing:
        getattr(student, f"{prefix}_checkpointing_enable")()
    # Eval mode, as in distillation (see compress/layer.py): the teacher's logits are recorded without dropout,
    # so a student trained with it on would chase noise. Only the flag transformers checkpoints a layer by
    # (`self.training` on a GradientCheckpointingLayer) is raised, which turns on no dropout of its children.
    student.eval()
    if checkpointing:
        for module in student.modules():
            if getattr(module, "gradient_checkpointing", False) is True:
                module.training = True
    try:
        yield
    finally:
        student.eval()
        if checkpointing:
            getattr(student, f"{prefix}_checkpointing_disable")()
        for p in factors:
            p.requires_grad_(False)


def _train(student: nn.Module, teacher: nn.Module, calibration: CalibrationData, config: HealConfig,
           factors: list[nn.Parameter], train_batches: list[slice], emit: EventSink, stop: threading.Event) -> None:
    """One AdamW pass over the batches on KL to the teacher's logits (computed batch by batch, never stored)."""
    device = next(student.parameters()).device
    seq_len = calibration.sequences.shape[1]
    optimizer = torch.optim.AdamW(factors, lr=config.lr, weight_decay=0.0)
    memory, throughput = MemoryMonitor(device), Throughput()
    start = time.time()
    for step, rows in enumerate(train_batches, 1):
        inputs = calibration.model_inputs(rows, device)
        with torch.no_grad():
            target = teacher(**inputs, use_cache=False).logits
        loss = kl_to_teacher(student(**inputs, use_cache=False).logits, target, config.temperature)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step - 1, len(train_batches), config.lr, config.warmup_steps, "cosine")
        optimizer.zero_grad(set_to_none=True)
        finite = bool(torch.isfinite(loss))
        if finite:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(factors, 1.0)
            optimizer.step()
        elapsed = time.time() - start
        mem = memory.sample()
        emit(Step(layer=WHOLE_MODEL, stage=StepStage.HEAL, step=step, steps=len(train_batches), global_step=step,
                  steps_total=len(train_batches), loss_teacher_input=loss.item(), loss_student_input=loss.item(),
                  lr=optimizer.param_groups[0]["lr"],
                  tokens_per_s=throughput.update((rows.stop - rows.start) * seq_len), elapsed_s=elapsed,
                  eta_s=eta_seconds(elapsed, step, len(train_batches)), vram_used_bytes=mem.used_bytes,
                  vram_total_bytes=mem.total_bytes, torch_peak_allocated_bytes=mem.peak_allocated_bytes,
                  torch_peak_reserved_bytes=mem.peak_reserved_bytes, skipped=not finite, rss_bytes=mem.rss_bytes))
        if stop.is_set():
            raise RunStopped("stopped by request")


@torch.no_grad()
def _restore(factors: list[nn.Parameter], saved: list[torch.Tensor]) -> None:
    for p, value in zip(factors, saved, strict=True):
        p.copy_(value)
