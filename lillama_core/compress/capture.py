"""Hook glue: capture what each block receives, run blocks over stored activations, and gather
input covariances for whitening. One generic mechanism for every architecture.

Blocks are called with the arguments the model itself passes them (masks, rotary embeddings,
per-layer attention types, a decoder's cross-attention states), recorded by stand-in blocks: once
per batch size where they do not depend on the data, once per batch where they do. Encoder-decoder
models are captured one stack at a time, the encoder running for real while the decoder is recorded.
"""

from __future__ import annotations

import inspect
import threading
import time
from collections.abc import Callable

import torch
from torch import nn

from ..data.calibration import CalibrationData
from ..errors import ModelLoadError
from ..factorize.svd import Covariance, CovarianceAccumulator, OutputCovariance, covariance_matrix
from ..modeling.discovery import Block, share_weights_copy, stack_of, stack_starts
from ..runtime.distributed import SINGLE, Parallel
from ..runtime.failures import stage
from ..runtime.finite import require_finite
from .batching import run_block
from .storage import ActivationStore


class _StopForward(Exception):
    pass


class Passthrough(nn.Module):
    """Takes a block's place and does no work: returns a fixed tensor if given, else its input."""

    def __init__(self, block: nn.Module, output: torch.Tensor | None = None):
        super().__init__()
        self.wrapped, self.output = block, output

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:  # models may read attributes of their blocks (attention_type, ...)
            return getattr(self.wrapped, name)

    def forward(self, *args, **kwargs):
        return self.output if self.output is not None else (args[0] if args else kwargs["hidden_states"])


class _StandIn(Passthrough):
    """Takes a block's place for one capture pass: records its inputs and passes them on."""

    def __init__(self, block: nn.Module, index: int, recorder: BlockInputs, last: bool):
        super().__init__(block)
        self.index, self.recorder, self.last = index, recorder, last
        # Some models pass masks and cross-attention states positionally (Whisper): record them by name.
        self.positional = [p.name for p in inspect.signature(block.forward).parameters.values()
                           if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]

    def forward(self, *args, **kwargs):
        named = dict(zip(self.positional, args, strict=False), **kwargs)  # args may stop short
        hidden = named.pop(self.positional[0]) if args else named.pop("hidden_states")
        self.recorder.record(self.index, hidden, named)
        if self.last:
            raise _StopForward
        return hidden


def block_label(block: Block) -> str:
    """How messages name a block: "layer 1 (model.layers.1)"."""
    return f"layer {block.index} ({block.name})"


def block_slot(model: nn.Module, block: Block) -> tuple[nn.ModuleList, int]:
    """(the list holding the block in this model or a copy of it, its position there)."""
    parent_name, _, idx = block.name.rpartition(".")
    return model.get_submodule(parent_name), int(idx)


def _same(a, b) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and torch.equal(a, b.to(a.device)))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and isinstance(a, (int, float, str, bool)) and a == b


_UNUSED_KWARGS = ("past_key_values", "past_key_value", "cache", "use_cache")


class BlockInputs:
    """Each stack's first-block hidden states for every sequence, and each block's keyword arguments.

    Arguments that are the same for every batch of a size (masks, rotary tables) are kept once per
    batch size; those that change with the data (a decoder's cross-attention states) once per batch."""

    def __init__(self, num_blocks: int):
        self.by_size: list[dict[int, dict]] = [dict() for _ in range(num_blocks)]
        self.by_batch: list[dict[int, dict]] = [dict() for _ in range(num_blocks)]
        self.first: set[int] = set()  # blocks whose hidden inputs are kept: the first of each stack
        self.hidden: list[torch.Tensor] = []
        self.rows = slice(0, 0)  # the batch now running
        self._expected_shape = None

    def record(self, index: int, hidden: torch.Tensor, kwargs: dict) -> None:
        if index in self.first:
            self.hidden.append(hidden.detach())
            self._expected_shape = hidden.shape
        elif hidden.shape != self._expected_shape:
            raise ModelLoadError("this architecture passes block outputs in a form the engine does not understand")
        kwargs = {k: v for k, v in kwargs.items() if k not in _UNUSED_KWARGS}
        shared = self.by_size[index].setdefault(hidden.shape[0], kwargs)
        changed = {k: v for k, v in kwargs.items() if not _same(v, shared.get(k))}
        if changed:
            self.by_batch[index][self.rows.start] = changed

    def takes(self, index: int, name: str) -> bool:
        """Whether block `index` was called with argument `name` (e.g. a decoder's encoder_hidden_states)."""
        return any(name in kwargs for kwargs in self.by_size[index].values())

    def kwargs_for(self, index: int) -> Callable[[slice], dict]:
        """The keyword arguments block `index` was called with for a batch (given by its rows)."""
        by_size, by_batch = self.by_size[index], self.by_batch[index]
        return lambda rows: {**by_size[rows.stop - rows.start], **by_batch.get(rows.start, {})}


@torch.no_grad()
@stage("capture")
def capture_block_inputs(model: nn.Module, blocks: list[Block], calibration: CalibrationData, batches: list[slice],
                         device: torch.device, store: ActivationStore | None = None,
                         ) -> tuple[dict[int, torch.Tensor], BlockInputs]:
    """Run the model's own forward with stand-ins for the blocks of one stack at a time, so those blocks
    do no work; the stacks before it (an encoder) run for real and give the later ones their inputs.

    Returns the hidden inputs of the first block of every stack, by block index (in `store`, else on
    `device`), and every block's keyword arguments. The stand-ins go into a weight-sharing copy, so the
    model itself is never altered and other threads (the app's chat) can keep using it meanwhile.
    """
    recorder = BlockInputs(len(blocks))
    firsts = {}
    for start in stack_starts(blocks):
        stack = [b for b in blocks if stack_of(b) == stack_of(start)]
        with_stand_ins = share_weights_copy(model)
        for block in stack:
            parent, idx = block_slot(with_stand_ins, block)
            parent[idx] = _StandIn(block.module, block.index, recorder, last=block is stack[-1])
        recorder.first = {start.index}
        for rows in batches:
            if rows.stop == rows.start:  # this process's share of a small batch can be empty
                continue
            recorder.rows = rows
            try:
                with_stand_ins(**calibration.model_inputs(rows, device), use_cache=False)
            except _StopForward:
                pass
            require_finite(recorder.hidden[-1], f"the model's input to {block_label(start)}")
        firsts[start.index] = store.cat(recorder.hidden) if store else torch.cat(recorder.hidden)
        recorder.hidden = []
    return firsts, recorder


@torch.no_grad()
def run_block_over(block: nn.Module, source: torch.Tensor, target: torch.Tensor, kwargs_for: Callable[[slice], dict],
                   batches: list[slice], device: torch.device, where: str = "a block") -> torch.Tensor:
    """target[i] = block(source[i]) batch by batch; target may be source itself (in-place update).
    The batches must be those the block inputs were captured with. Raises NonFiniteError, naming the
    block as `where`, as soon as an output holds inf or NaN (float16 overflows at 65504), so nothing
    downstream (covariances, SVDs, losses) is computed from it."""
    for rows in batches:
        if rows.stop == rows.start:
            continue
        # Asynchronous from pinned memory; the blocking copy back below orders it before `source` is rewritten.
        out = run_block(block, source[rows].to(device, non_blocking=True), kwargs_for(rows))
        require_finite(out, where)
        target[rows] = out.to(target.device, target.dtype)
    return target


def whitened_on_outputs(module: nn.Module) -> bool:
    """Whether a linear's whitening statistics are gathered on its outputs: when it has fewer outputs than
    inputs, out^2 per token instead of in^2 (see OutputCovariance); else on its inputs, which modules reading
    one tensor (q/k/v, gate/up) share."""
    return getattr(module, "out_features", None) is not None and module.out_features < module.in_features


class LinearCovariances:
    """The whitening statistics of chosen linear modules of one block, gathered while the block runs: the
    input covariance X^T X, or for a module with fewer outputs than inputs the output covariance
    (W X)(W X)^T (whitened_on_outputs).

    Modules that read the very same tensor object (q/k/v, gate/up) share one input accumulator, computed
    once. The tensors seen are held until the next batch so their ids cannot be reused meanwhile.
    Only calls from the creating thread count: the app may run the same teacher block for chat.
    """

    def __init__(self, block: nn.Module, module_names: list[str], device: torch.device):
        self.accumulators: dict[str, CovarianceAccumulator] = {}
        self._seen_this_batch: dict[int, tuple[torch.Tensor, CovarianceAccumulator]] = {}
        self._device = device
        self.seconds = 0.0  # spent in the hooks (inside the block's forward)
        self._thread = threading.get_ident()
        modules = {name: block.get_submodule(name) for name in module_names}
        self.on_outputs = {name for name, module in modules.items() if whitened_on_outputs(module)}
        self._features = {name: module.out_features if name in self.on_outputs else module.in_features
                          for name, module in modules.items()}
        self._handles = [block.register_forward_pre_hook(self._new_batch)]
        for name, module in modules.items():
            hook = self._output_hook_for(name) if name in self.on_outputs else self._input_hook_for(name)
            self._handles.append(module.register_forward_hook(hook))

    def _new_batch(self, *_):
        if threading.get_ident() == self._thread:
            self._seen_this_batch.clear()

    def _input_hook_for(self, name: str):
        def hook(module, args, output):
            if threading.get_ident() != self._thread:
                return
            x = args[0]
            seen = self._seen_this_batch.get(id(x))
            if seen is not None:
                self.accumulators[name] = seen[1]
                return
            start = time.perf_counter()
            acc = self.accumulators.setdefault(name, CovarianceAccumulator(x.shape[-1], self._device))
            acc.add(x)
            self._seen_this_batch[id(x)] = (x, acc)
            self.seconds += time.perf_counter() - start

        return hook

    def _output_hook_for(self, name: str):
        def hook(module, args, output):
            if threading.get_ident() != self._thread:
                return
            start = time.perf_counter()
            acc = self.accumulators.setdefault(name, CovarianceAccumulator(output.shape[-1], self._device))
            acc.add(output.float() - module.bias.float() if module.bias is not None else output)
            self.seconds += time.perf_counter() - start

        return hook

    def means(self, parallel: Parallel = SINGLE) -> dict[str, Covariance]:
        """Every module's covariance over all processes' data: X^T X / tokens (a tensor, in x in), or an
        OutputCovariance (out x out) for the modules whitened on their outputs. A module that saw no token (an
        MoE expert no calibration token was routed to) gets zeros, which whitening turns into the plain SVD
        split (see factorize.svd.WhitenedSVD); unreached_experts counts them."""
        out: dict[str, Covariance] = {}
        for name, features in self._features.items():  # the same order in every process
            acc = self.accumulators.get(name)
            total = acc.sum if acc else torch.zeros(features, features, dtype=torch.float64, device=self._device)
            tokens = acc.tokens if acc else 0
            if parallel.enabled:  # a copy, so an accumulator shared by several modules is summed only once
                total = parallel.all_reduce(total.clone())
                tokens, = parallel.sum_values(tokens, device=self._device)
            mean = total / max(tokens, 1)
            out[name] = OutputCovariance(mean) if name in self.on_outputs else mean
        return out

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def unreached_experts(covariances: dict[str, Covariance]) -> int:
    """How many experts no calibration token reached: the distinct parents (e.g. `mlp.experts.3`) of the
    modules whose covariance (from LinearCovariances.means) is all zero."""
    return len({name.rpartition(".")[0] for name, cov in covariances.items() if not covariance_matrix(cov).any()})
