"""How much each layer hurts the model when compressed: the measurement behind the `sensitivity`
rank allocation.

For every block in turn, the block alone is factorised (whitened, no training) at a few kept
shares, the rest of the model is left exact, and the KL divergence of the final next-token
distribution from the teacher's is measured on a few calibration sequences. Blocks before the one
probed are replaced by stand-ins that replay its recorded input, so each probe only runs the blocks
from the probed one to the top, through the model's own forward (norms, heads, soft-capping and all).
"""

from __future__ import annotations

import copy
import threading

import torch
import torch.nn.functional as F
from torch import nn

from ..compress.batching import batch_slices
from ..compress.capture import (
    LinearCovariances,
    Passthrough,
    block_label,
    block_slot,
    capture_block_inputs,
    run_block_over,
)
from ..data.calibration import CalibrationData
from ..errors import RunStopped
from ..events import EventSink, Phase
from ..factorize.svd import OutputWhitenedSVD, WhitenedSVD, low_rank_from_factors, whitened_svd
from ..modeling.discovery import Block, find_blocks, share_weights_copy
from ..modeling.loading import LoadedModel
from ..modeling.shipped import set_submodule
from ..runtime.finite import require_finite_weights
from ..runtime.offload import resident
from .ranks import ModelShape, ModuleShape

KEEP_LEVELS = (0.6, 0.4, 0.2)
PROBE_SEQUENCES = 2
HEADROOM = 0.6  # the deepest rung probed sits below this share of the average kept share a target needs
SHALLOWEST_EXTRA_KEEP = 0.02


def probe_keeps(shape: ModelShape, groups: list[str], target_saving: int) -> tuple[float, ...]:
    """KEEP_LEVELS, deepened by halving when the target leaves too little room under the deepest one.

    A plan can only choose between layers if some can go deeper than the average; 30% of Gemma-3
    270M's whole model is about 80% of its block weights (its embeddings are the rest), so every
    layer would have to sit at the 20% rung and the plan could not be built at all."""
    dense = sum(m.dense_params for m in shape.modules if m.group in groups)
    average_keep = 1 - target_saving / dense if dense else 1.0
    keeps = KEEP_LEVELS
    while keeps[-1] > HEADROOM * average_keep and keeps[-1] / 2 >= SHALLOWEST_EXTRA_KEEP:
        keeps += (keeps[-1] / 2,)
    return keeps


def compressed_block(block: nn.Module, modules: list[ModuleShape], keep: float,
                     decompositions: dict[str, WhitenedSVD | OutputWhitenedSVD]) -> nn.Module:
    """A copy of the block with each module whitened-factorised to keep about `keep` of its weights."""
    low = copy.deepcopy(block)
    for m in modules:
        rank = m.rank_for_keep(keep)
        if rank <= m.max_saving_rank:
            dense = low.get_submodule(m.local_name)
            factor = low_rank_from_factors(dense, *decompositions[m.local_name].factors(rank))
            set_submodule(low, m.local_name, factor.to(dense.weight.dtype))
    return low


class NextTokenReference:
    """The teacher's next-token distributions p, kept so that each probe's KL(p || q) is one pass over the probe's
    own logits z: KL = sum p log p - sum p z + logsumexp(z), as sum p = 1. A log-softmax of every probe and an
    elementwise KL over the whole vocabulary cost more than the model's head on a large vocabulary (Gemma-3's
    262k tokens)."""

    def __init__(self, logits: torch.Tensor):
        log_p = F.log_softmax(logits.float(), dim=-1)
        self.probs = log_p.exp()
        self.neg_entropy = (self.probs * log_p).sum(-1)

    def kl(self, logits: torch.Tensor) -> torch.Tensor:
        """Per-position KL(teacher || model) in nats, for logits shaped as the teacher's."""
        z = logits.float()
        vocab = z.shape[-1]
        expected = torch.bmm(self.probs.reshape(-1, 1, vocab), z.reshape(-1, vocab, 1)).reshape(z.shape[:-1])
        return self.neg_entropy - expected + torch.logsumexp(z, dim=-1)


@torch.no_grad()
def _logits(model: nn.Module, inputs: dict) -> torch.Tensor:
    return model(**inputs, use_cache=False).logits


@torch.no_grad()
def measure_sensitivity(loaded: LoadedModel, calibration: CalibrationData, groups: list[str],
                        keeps: tuple[float, ...] = KEEP_LEVELS, batch_size: int = 8,
                        on_event: EventSink | None = None, stop: threading.Event | None = None,
                        spectra: dict[str, torch.Tensor] | None = None) -> dict[int, dict[float, float]]:
    """{layer: {keep: KL(teacher || model with that layer compressed)}} in nats per token. A stop request
    is honoured between probes (under a second per probe for SmolLM2 on a CPU) and raises RunStopped.

    Args:
        spectra: when given, filled with each probed module's whitened singular values (full module name ->
            singular values of W L, descending, float32 on the CPU): the probes decompose every module anyway,
            and the Ranks step shows them."""
    model, device = loaded.model, loaded.device
    shape = ModelShape.of(model)
    blocks = find_blocks(model)
    probe = min(PROBE_SEQUENCES, calibration.sequences.shape[0])
    batches = [slice(0, probe)] + batch_slices(probe, calibration.sequences.shape[0], batch_size)
    starts, inputs = capture_block_inputs(model, blocks, calibration, batches, device)
    probe_inputs = calibration.model_inputs(slice(0, probe), device)
    reference = NextTokenReference(_logits(model, probe_inputs))
    replay = share_weights_copy(model)
    result: dict[int, dict[float, float]] = {}
    for block in blocks:
        _honour_stop(stop)
        first_of_stack = block.index in starts
        if first_of_stack:
            hidden = starts.pop(block.index)
            for below in blocks[:block.index]:  # an earlier stack (the encoder) runs in full for this one
                _put(replay, below, below.module)
        with resident(block.module):  # a streamed block stays on the accelerator for its probes
            modules = [m for m in shape.modules if m.layer == block.index and m.group in groups]
            probe_input = hidden[:probe].clone()
            covs = LinearCovariances(block.module, [m.local_name for m in modules], device)
            try:
                run_block_over(block.module, hidden, hidden, inputs.kwargs_for(block.index), batches, device,
                               block_label(block))
            finally:
                covs.close()
            if not modules:
                continue
            if not first_of_stack:  # blocks below replay the recorded input instead of recomputing it
                below = blocks[block.index - 1]
                _put(replay, below, Passthrough(below.module, probe_input))
            result[block.index] = {}
            require_finite_weights(block.module, [m.local_name for m in modules], block_label(block), loaded.dtype)
            covariances = covs.means()
            weights = {m.local_name: block.module.get_submodule(m.local_name).weight.detach().float() for m in modules}
            decompositions = {name: whitened_svd(weight, covariances[name]) for name, weight in weights.items()}
            if spectra is not None:
                spectra.update({f"{block.name}.{name}": d.s.float().cpu() for name, d in decompositions.items()})
            for keep in keeps:
                _honour_stop(stop)
                _put(replay, block, compressed_block(block.module, modules, keep, decompositions))
                result[block.index][keep] = reference.kl(_logits(replay, probe_inputs)).mean().item()
            _put(replay, block, Passthrough(block.module))
            if on_event:
                on_event(Phase(name="sensitivity", detail=f"layer {block.index + 1}/{len(blocks)}: KL at keep "
                                              + ", ".join(f"{k:.0%}={v:.3f}" for k, v in result[block.index].items())))
    return result


def _honour_stop(stop: threading.Event | None) -> None:
    if stop is not None and stop.is_set():
        raise RunStopped("stopped by request while measuring layer sensitivity; nothing was compressed")


def _put(model: nn.Module, block: Block, module: nn.Module) -> None:
    parent, position = block_slot(model, block)
    parent[position] = module
