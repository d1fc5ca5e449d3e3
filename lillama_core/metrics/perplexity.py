"""Perplexity: exp(mean next-token negative log-likelihood) over held-out windows of text."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..data.calibration import with_leading_tokens
from ..errors import CalibrationError
from ..runtime.failures import stage


def device_of(model: nn.Module) -> torch.device:
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
    device = device_of(model)
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
