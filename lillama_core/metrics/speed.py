"""Speed and size of a model: prefill and generation tokens/s, parameters, weight bytes, peak memory."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from ..chat import SamplingConfig, decode
from ..modeling.discovery import count_parameters, weight_bytes
from ..runtime.failures import stage
from ..runtime.graphs import GraphDecoder
from ..runtime.telemetry import synchronize
from .perplexity import device_of


@dataclass
class SpeedResult:
    batch_size: int
    prompt_tokens: int
    new_tokens: int
    prefill_tokens_per_s: float
    generate_tokens_per_s: float  # new tokens over all sequences of the batch, per second
    graphs: bool = False  # decoded through a static cache with the decode step compiled (CUDA graphs on a GPU)
    warm_up_seconds: float | None = None  # with graphs: compiling (and recording) the step for this shape


@stage("evaluation")
@torch.no_grad()
def generation_speed(model: nn.Module, vocab_size: int, batch_size: int = 1, prompt_tokens: int = 64,
                     new_tokens: int = 32, seed: int = 0, graphs: GraphDecoder | None = None) -> SpeedResult:
    """Greedy decoding from random prompts, after a warm-up; prefill timed separately.

    Args:
        model: a causal LM on its device.
        vocab_size: prompts are drawn from [0, vocab_size).
        batch_size: sequences decoded together.
        prompt_tokens: tokens of each prompt; new_tokens: tokens generated after it (all of them: no stop token).
        seed: seeds the prompts.
        graphs: `model`'s GraphDecoder, to decode through its static cache and compiled step; its warm-up
            (compiling this shape, tens of seconds the first time) is timed apart, as `warm_up_seconds`.
    Returns:
        Tokens/s of the prefill (one uncached forward of the prompts) and of decoding (its own prefill included).
    """
    device = device_of(model)
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab_size, (batch_size, prompt_tokens), generator=generator).to(device)
    greedy = SamplingConfig(max_new_tokens=new_tokens, temperature=0, repetition_penalty=1.0)
    warm_up = None
    if graphs is not None:
        warm_up = graphs.warm_up(batch_size, prompt_tokens + new_tokens)
    else:  # first-call costs outside the timing
        for _ in decode(model, prompt[:, :8], SamplingConfig(max_new_tokens=2, temperature=0, repetition_penalty=1.0)):
            pass
    synchronize(device)
    start = time.perf_counter()
    model(input_ids=prompt, use_cache=False)
    synchronize(device)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    produced = sum(1 for _ in decode(model, prompt, greedy, graphs=graphs))
    synchronize(device)
    generate = time.perf_counter() - start
    return SpeedResult(batch_size, prompt_tokens, produced, batch_size * prompt_tokens / prefill,
                       batch_size * produced / generate, graphs is not None, warm_up)


@dataclass
class SizeResult:
    parameters: int
    weight_bytes: int
    peak_memory_bytes: int | None  # CUDA peak while measured; None on CPU


def model_size(model: nn.Module) -> SizeResult:
    device = device_of(model)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return SizeResult(count_parameters(model), weight_bytes(model), peak)
