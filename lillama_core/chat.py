"""Token-by-token generation with a KV cache, for streamed chat and for speed measurements.

Our own small loop rather than `generate()`: each model gets its own seeded generator, so the
teacher and the student sample with the same settings and seed without sharing global RNG state,
and a stop request is seen between any two tokens. The forwards run eagerly on a cache that grows
(`eager_session`), or through a static cache with the decode step compiled (runtime/graphs.py).
"""

from __future__ import annotations

import inspect
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .runtime.graphs import WARM_UP_NOTE, GraphDecoder


@dataclass
class SamplingConfig:
    max_new_tokens: int = 200
    temperature: float = 0.7  # 0 means greedy
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float = 1.1
    seed: int = 0


@dataclass
class GenerationUpdate:
    text: str
    new_tokens: int
    tokens_per_s: float
    done: bool
    note: str = ""  # what the wait is for before the first token, e.g. WARM_UP_NOTE


def build_prompt(tokenizer, message: str, history: list[dict] | None = None) -> torch.Tensor:
    """Prompt ids: through the chat template when the tokenizer has one, else the raw text."""
    messages = list(history or []) + [{"role": "user", "content": message}]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    return tokenizer(message, return_tensors="pt")["input_ids"]


def stop_token_ids(model: nn.Module, tokenizer) -> set[int]:
    ids = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (configured, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(value)
    return ids


def pick_next(logits: torch.Tensor, seen: torch.Tensor, sampling: SamplingConfig,
              generator: torch.Generator | None) -> torch.Tensor:
    """Next token ids [batch] from last-position logits [batch, vocab]."""
    logits = logits.float()
    if sampling.repetition_penalty != 1.0:
        picked = logits.gather(1, seen)
        picked = torch.where(picked > 0, picked / sampling.repetition_penalty, picked * sampling.repetition_penalty)
        logits = logits.scatter(1, seen, picked)
    if sampling.temperature <= 0:
        return logits.argmax(-1)
    logits = logits / sampling.temperature
    if sampling.top_k > 0:
        kth = logits.topk(min(sampling.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) > sampling.top_p
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


def cache_argument(model: nn.Module) -> str:
    """The name of the key/value cache in the model's forward and output: transformers 5.24 renamed
    past_key_values to cache."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@contextmanager
def eager_session(model: nn.Module) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
    """Yields `forward(ids [batch, n]) -> last-position logits [batch, vocab]` on a cache that grows with
    each call: the first call is the prefill, each later one the new token column."""
    cache = None
    cache_name = cache_argument(model)

    def forward(ids: torch.Tensor) -> torch.Tensor:
        nonlocal cache
        out = model(input_ids=ids, use_cache=True, **{cache_name: cache})
        cache = getattr(out, cache_name)
        return out.logits[:, -1]

    yield forward


@torch.no_grad()
def decode(model: nn.Module, input_ids: torch.Tensor, sampling: SamplingConfig, stop_ids: set[int] = frozenset(),
           stop: threading.Event | None = None, graphs: GraphDecoder | None = None) -> Iterator[torch.Tensor]:
    """Yield each new token column [batch] until max_new_tokens, a stop token (batch 1) or a stop request.

    Args:
        model: a causal LM on its device.
        input_ids: prompt ids [batch, prompt tokens], all rows the same length (no padding).
        sampling: the sampling settings; `seed` seeds this call's own generator.
        stop_ids: token ids that end a batch-1 answer (yielded, then decoding ends).
        stop: set it to end decoding before the next forward.
        graphs: `model`'s GraphDecoder, to decode through its static cache and compiled step (warmed up first
            when this shape is new); None decodes eagerly.
    """
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(sampling.seed)
    ids = input_ids.to(device)
    seen = ids
    batch, prompt = ids.shape
    session = graphs.session(batch, prompt + sampling.max_new_tokens) if graphs else eager_session(model)
    with session as forward:
        step_input = ids
        for _ in range(sampling.max_new_tokens):
            if stop is not None and stop.is_set():
                return
            token = pick_next(forward(step_input), seen, sampling, generator)
            seen = torch.cat([seen, token[:, None]], dim=1)
            yield token
            if batch == 1 and int(token[0]) in stop_ids:
                return
            step_input = token[:, None]


def stream_chat(model: nn.Module, tokenizer, message: str, sampling: SamplingConfig,
                history: list[dict] | None = None, stop: threading.Event | None = None,
                graphs: GraphDecoder | None = None) -> Iterator[GenerationUpdate]:
    """Stream the growing answer text with the running tokens/s (first token's prefill included).

    With `graphs` (the model's GraphDecoder), decoding runs through its static cache and compiled step; when
    that shape has not been compiled yet, an update with `note=WARM_UP_NOTE` comes first, then the warm-up,
    which the tokens/s leave out."""
    prompt = build_prompt(tokenizer, message, history)
    stops = stop_token_ids(model, tokenizer)
    length = prompt.shape[1] + sampling.max_new_tokens
    if graphs is not None and graphs.needs_warm_up(1, length):
        yield GenerationUpdate("", 0, 0.0, False, WARM_UP_NOTE)
        graphs.warm_up(1, length)
    tokens: list[int] = []
    start = time.perf_counter()
    for token in decode(model, prompt, sampling, stops, stop, graphs):
        value = int(token[0])
        if value in stops:
            break
        tokens.append(value)
        rate = len(tokens) / max(time.perf_counter() - start, 1e-9)
        yield GenerationUpdate(tokenizer.decode(tokens, skip_special_tokens=True), len(tokens), rate, False)
    rate = len(tokens) / max(time.perf_counter() - start, 1e-9)
    yield GenerationUpdate(tokenizer.decode(tokens, skip_special_tokens=True), len(tokens), rate, True)


def complete(model: nn.Module, tokenizer, message: str, sampling: SamplingConfig) -> GenerationUpdate:
    """The whole answer at once (CLI one-shot use and tests)."""
    *_, whole = stream_chat(model, tokenizer, message, sampling)  # the last update holds the whole answer
    return whole
