"""The one evaluation path: a model's quality (through its task), speed and size as one EvalRecord."""

from __future__ import annotations

import torch
from torch import nn

from ..modeling.positions import position_limit
from ..modeling.quantize import serialized_bytes
from ..runtime.graphs import GraphDecoder
from .record import EvalRecord
from .speed import generation_speed, model_size


def evaluate(model: nn.Module, tokenizer, task, held_out, batch_size: int = 4, speed_batches: tuple[int, ...] = (),
             fit_positions: bool = False, size: bool = True, graphs: GraphDecoder | None = None) -> EvalRecord:
    """Score `model` on `held_out` (from `task.held_out`), then measure its generation speed at each of
    `speed_batches` the task can measure (64 prompt + 32 new tokens; with `fit_positions`, shortened to the
    model's positions), and (with `size`) its size: parameters, serialised weight bytes, CUDA peak memory.

    Args:
        model: the model to measure, on its device.
        tokenizer: its tokenizer.
        task: a tasks.Task.
        held_out: that task's held-out data.
        batch_size: sequences per forward while scoring.
        speed_batches: batch sizes to time greedy decoding at (1 and 16 are recorded).
        fit_positions: shorten the timed prompt and continuation to the model's positions.
        size: measure the size; serialising the weights costs a copy of them in host memory.
        graphs: `model`'s GraphDecoder: time decoding through its static cache and compiled step.
    Returns:
        An EvalRecord; what was not measured is None.
    Raises:
        ModelForwardError: the model's forward failed; OutOfMemoryError is left to the caller."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    record = task.score(model, tokenizer, held_out, batch_size)
    prompt, new = 64, 32
    if fit_positions:  # a prompt and its continuation within the model's positions (64 + 32 where it allows)
        prompt = min(64, 2 * (position_limit(model) or 96) // 3)
        new = min(32, (position_limit(model) or 96) - prompt)
    for batch in (b for b in speed_batches if b in task.speed_batches):
        speed = generation_speed(model, model.config.vocab_size, batch_size=batch, prompt_tokens=prompt,
                                 new_tokens=new, graphs=graphs)
        suffix = "" if batch == 1 else f"_b{batch}"
        setattr(record, f"prefill_tokens_per_s{suffix}", speed.prefill_tokens_per_s)
        setattr(record, f"generate_tokens_per_s{suffix}", speed.generate_tokens_per_s)
    if size:
        measured = model_size(model)
        record.parameters, record.weight_bytes = measured.parameters, serialized_bytes(model)
        record.peak_memory_bytes = measured.peak_memory_bytes
    return record
