"""Decoding through a static KV cache with the one-token decode step compiled: CUDA graphs on a GPU.

Eager decoding of a small model is bound by Python and kernel launches: a student's two matmuls per replaced
linear cost more launches than its smaller weights save. torch.compile "reduce-overhead" records the decode
step as CUDA graphs, so a step costs its kernels' time alone. A graph replays fixed shapes at fixed addresses,
so the KV cache is transformers' StaticCache: keys and values preallocated for a fixed number of positions,
updated in place (its tensors are marked as static addresses), the step attending over all positions with
the unwritten ones masked. The prefill (a prompt of any length) runs eagerly on that cache, as `generate()`
does; the compile settings are `generate()`'s too (transformers' CompileConfig: inductor, "reduce-overhead").

Off a GPU there are no CUDA graphs; inductor still compiles the step into fused C++ kernels.
"""

from __future__ import annotations

import inspect
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch
from torch import nn

from .telemetry import synchronize

WARM_UP_NOTE = "compiling the decode step… (first time only)"
MIN_CACHE_POSITIONS = 128


def cache_positions(tokens: int) -> int:
    """Positions of the static cache for a prompt and continuation of `tokens` in all: the next power of two,
    at least MIN_CACHE_POSITIONS, so chat turns of similar lengths share one compiled step (each new length
    compiles again, and every step attends over all positions, so a far larger cache would cost time)."""
    return max(MIN_CACHE_POSITIONS, 1 << (max(tokens, 1) - 1).bit_length())


def compile_config(device: torch.device):
    """transformers' CompileConfig for `device`: CUDA graphs ("reduce-overhead") on CUDA; inductor's default
    mode elsewhere, where CUDA graphs do not exist."""
    from transformers import CompileConfig

    return CompileConfig() if device.type == "cuda" else CompileConfig(mode="default")


class GraphDecoder:
    """One model's decoding through a static KV cache and a compiled decode step, kept between calls.

    The compiled step and the cache outlive each call, so a chat's later turns reuse both; a new
    (batch, cache positions) shape compiles (and records) once, in `warm_up`. Every forward runs on one
    worker thread of this decoder: CUDA graphs are recorded per thread (torch's cudagraph trees keep
    thread-local state), so callers on other threads (a UI's thread per answer) replay the same graphs
    instead of recording new ones. One session runs at a time: the cache holds one sequence batch.
    """

    def __init__(self, model: nn.Module, config=None, on_warm_up: Callable[[str], None] | None = None):
        """Args:
            model: a causal LM whose forward takes transformers' `cache` (5.24) or `past_key_values`.
            config: a transformers CompileConfig; by default `compile_config` of the model's device.
            on_warm_up: called with WARM_UP_NOTE as each new shape starts compiling (a CLI prints it).
        """
        from ..chat import cache_argument

        self.model = model
        self.device = next(model.parameters()).device
        self.config = config or compile_config(self.device)
        self.on_warm_up = on_warm_up
        self._cache_name = cache_argument(model)
        # older transformers place each token in a static cache at `cache_position`; 5.24 counts the tokens written
        # in the cache itself and has no such argument
        self._positioned = "cache_position" in inspect.signature(model.forward).parameters
        self._written = 0  # tokens in the cache, on the host
        self._compiled = torch.compile(model.__call__, **self.config.to_dict())
        self._cache = None
        self._shape: tuple[int, int] | None = None  # (batch, positions) of the cache
        self._warm: set[tuple[int, int]] = set()
        self._session = threading.Lock()
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="lillama-graphs")

    def needs_warm_up(self, batch: int, tokens: int) -> bool:
        """Whether decoding `batch` sequences of `tokens` (prompt and continuation) first compiles a step."""
        return (batch, cache_positions(tokens)) not in self._warm

    def warm_up(self, batch: int, tokens: int) -> float:
        """Compile the step for this shape (and on CUDA record its graphs) on a dummy sequence.

        Args:
            batch: sequences decoded together.
            tokens: prompt and continuation, in tokens.
        Returns:
            Seconds spent, 0.0 when the shape was already warm.
        """
        with self._session:
            return self._warm_up(batch, cache_positions(tokens))

    @contextmanager
    def session(self, batch: int, tokens: int) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
        """A decoding session: yields `forward(ids [batch, n]) -> last-position logits [batch, vocab]` (float32,
        the caller's to keep). Its first call is the prefill (eager); each later one a single token column
        through the compiled step. Warms the shape up first if needed; waits for any other session to end.

        Args:
            batch: sequences decoded together.
            tokens: prompt and continuation, in tokens: the cache holds at least this many positions.
        """
        positions = cache_positions(tokens)
        with self._session:
            self._warm_up(batch, positions)
            self._call(self._reset)
            started = False

            def forward(ids: torch.Tensor) -> torch.Tensor:
                nonlocal started
                step = self._decode if started else self._prefill
                started = True
                return self._call(step, ids.to(self.device))

            yield forward

    def close(self) -> None:
        """End the worker thread; the decoder cannot be used afterwards."""
        self._worker.shutdown(wait=True)

    def _call(self, fn, *args):
        """Run `fn(*args)` on the worker thread, without autograd, and wait for its result."""
        return self._worker.submit(_without_grad, fn, *args).result()

    def _use_cache(self, batch: int, positions: int) -> None:
        """Hold a cache of this shape: a shape compiled earlier may come back after another one replaced it."""
        if self._shape != (batch, positions):
            from transformers import StaticCache

            self._cache = None  # the old cache's memory goes before the new one is allocated
            self._cache = StaticCache(config=self.model.config, max_cache_len=positions)
            self._shape = (batch, positions)

    def _warm_up(self, batch: int, positions: int) -> float:
        self._use_cache(batch, positions)
        if (batch, positions) in self._warm:
            return 0.0
        if self.on_warm_up is not None:
            self.on_warm_up(WARM_UP_NOTE)
        start = time.perf_counter()
        dummy = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        self._call(self._reset)
        self._call(self._prefill, dummy)
        for _ in range(3):  # compile; on CUDA also the cudagraph trees' warm-up run and recording; then a replay
            self._call(self._decode, dummy)
        self._call(self._reset)
        synchronize(self.device)
        self._warm.add((batch, positions))
        return time.perf_counter() - start

    # ---- run through _call, on the worker thread ----

    def _reset(self) -> None:
        self._cache.reset()
        self._written = 0

    def _inputs(self, ids: torch.Tensor) -> dict:
        inputs = {"input_ids": ids, "use_cache": True, self._cache_name: self._cache}
        if self._positioned:
            inputs["cache_position"] = torch.arange(self._written, self._written + ids.shape[1], device=self.device)
        self._written += ids.shape[1]
        return inputs

    def _prefill(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(**self._inputs(ids)).logits[:, -1].to(torch.float32, copy=True)

    def _decode(self, ids: torch.Tensor) -> torch.Tensor:
        torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs may be overwritten from now on
        out = self._compiled(**self._inputs(ids))
        return out.logits[:, -1].to(torch.float32, copy=True)  # a copy: the next replay overwrites the graph's output


def _without_grad(fn, *args):
    with torch.no_grad():  # grad mode is per thread: the worker's own
        return fn(*args)
