"""Quality, speed and size of a model: perplexity, prefill and generation tokens/s, parameters, memory."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..chat import SamplingConfig, decode
from ..data.calibration import with_leading_tokens
from ..errors import CalibrationError
from ..modeling.discovery import count_parameters, weight_bytes
from ..runtime.failures import stage
from ..runtime.telemetry import synchronize


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def eval_windows(tokenizer, text: str, tokens: int, seq_len: int) -> torch.Tensor:
    """The first `tokens` tokens of the text as non-overlapping windows [n, seq_len], each led by the
    tokenizer's <bos> if it adds one (as the model saw every sequence in training)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:tokens]
    windows = with_leading_tokens(ids, tokenizer, seq_len)
    if windows.shape[0] == 0:
        raise CalibrationError(f"evaluation text has {len(ids)} tokens, fewer than one window of {seq_len}")
    return windows


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float
    tokens_scored: int
    seconds: float


@stage("evaluation")
@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4,
               on_progress: Callable[[int, int], None] | None = None) -> PerplexityResult:
    """exp(mean next-token NLL) over every window; each window predicts its own seq_len - 1 tokens."""
    device = _device_of(model)
    start = time.perf_counter()
    total_nll, count = 0.0, 0
    for i in range(0, windows.shape[0], batch_size):
        batch = windows[i: i + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        total_nll += nll.item()
        count += batch[:, 1:].numel()
        if on_progress:
            on_progress(min(i + batch_size, windows.shape[0]), windows.shape[0])
    mean = total_nll / count
    return PerplexityResult(math.exp(min(mean, 700)), mean, count, time.perf_counter() - start)


@dataclass
class SpeedResult:
    batch_size: int
    prompt_tokens: int
    new_tokens: int
    prefill_tokens_per_s: float
    generate_tokens_per_s: float  # new tokens over all sequences of the batch, per second


@stage("evaluation")
@torch.no_grad()
def generation_speed(model: nn.Module, vocab_size: int, batch_size: int = 1, prompt_tokens: int = 64,
                     new_tokens: int = 32, seed: int = 0) -> SpeedResult:
    """Greedy decoding from random prompts, after one warm-up; prefill timed separately."""
    device = _device_of(model)
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab_size, (batch_size, prompt_tokens), generator=generator).to(device)
    greedy = SamplingConfig(max_new_tokens=new_tokens, temperature=0, repetition_penalty=1.0)
    for _ in decode(model, prompt[:, :8], SamplingConfig(max_new_tokens=2, temperature=0, repetition_penalty=1.0)):
        pass
    synchronize(device)
    start = time.perf_counter()
    model(input_ids=prompt, use_cache=False)
    synchronize(device)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    produced = sum(1 for _ in decode(model, prompt, greedy))
    synchronize(device)
    generate = time.perf_counter() - start
    return SpeedResult(batch_size, prompt_tokens, produced, batch_size * prompt_tokens / prefill,
                       batch_size * produced / generate)


@dataclass
class SizeResult:
    parameters: int
    weight_bytes: int
    peak_memory_bytes: int | None  # CUDA peak while measured; None on CPU


def model_size(model: nn.Module) -> SizeResult:
    device = _device_of(model)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return SizeResult(count_parameters(model), weight_bytes(model), peak)


def evaluate_model(model: nn.Module, tokenizer, windows: torch.Tensor, speed: bool = True,
                   batch_size: int = 4) -> dict:
    """One flat record for tables: perplexity, size and (optionally) speed at batch 1."""
    device = _device_of(model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ppl = perplexity(model, windows, batch_size)
    record = {"perplexity": ppl.perplexity, "nll": ppl.nll, "eval_tokens": ppl.tokens_scored,
              "eval_seconds": ppl.seconds}
    if speed:
        vocab = model.config.vocab_size if hasattr(model, "config") else tokenizer.vocab_size
        s = generation_speed(model, vocab)
        record.update(prefill_tokens_per_s=s.prefill_tokens_per_s, generate_tokens_per_s=s.generate_tokens_per_s)
    record.update(asdict(model_size(model)))
    return record
