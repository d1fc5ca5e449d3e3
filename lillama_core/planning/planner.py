"""Build a rank plan for a loaded model: measure what the chosen strategy needs (whitened spectra,
per-layer sensitivity), then allocate ranks."""

from __future__ import annotations

import threading

import torch

from ..compress.batching import batch_slices
from ..compress.capture import InputCovariances, block_label, capture_block_inputs, run_block_over
from ..config import PlanConfig
from ..data.calibration import CalibrationData
from ..errors import CalibrationError
from ..events import EventSink, Phase
from ..factorize.svd import spectrum, whitened_spectrum
from ..modeling.discovery import find_blocks, find_linears
from ..modeling.loading import LoadedModel
from ..runtime.offload import resident
from .ranks import ModelShape, RankPlan, build_plan, reduction_target


def compute_spectra(loaded: LoadedModel, shape: ModelShape, calibration: CalibrationData | None,
                    batch_size: int, whitened: bool, on_event: EventSink | None = None) -> dict[str, torch.Tensor]:
    """Singular values of every linear in the blocks; whitened by the teacher's inputs if asked."""
    blocks = find_blocks(loaded.model)
    if not whitened or calibration is None:
        return {m.name: spectrum(loaded.model.get_submodule(m.name).weight.detach()) for m in shape.modules}
    device = loaded.device
    batches = batch_slices(0, calibration.sequences.shape[0], batch_size)
    starts, inputs = capture_block_inputs(loaded.model, blocks, calibration, batches, device)
    spectra = {}
    for block in blocks:
        if block.index in starts:
            hidden = starts.pop(block.index)
        names = list(find_linears(block.module))
        with resident(block.module):
            covs = InputCovariances(block.module, names, device)
            try:
                run_block_over(block.module, hidden, hidden, inputs.kwargs_for(block.index), batches, device,
                               block_label(block))
            finally:
                covs.close()
            for local, cov in covs.means().items():
                weight = block.module.get_submodule(local).weight.detach()
                spectra[f"{block.name}.{local}"] = whitened_spectrum(weight.float(), cov)
        if on_event:
            on_event(Phase("spectra", f"layer {block.index + 1}/{len(blocks)}"))
    return spectra


PLANNING_TOKENS = 16_384  # whitened spectra for planning need far fewer tokens than distillation


SENSITIVITY_TOKENS = 2048  # covariances for the probes; the KL itself is measured on two sequences


def make_plan(loaded: LoadedModel, config: PlanConfig, calibration: CalibrationData | None = None,
              batch_size: int = 8, on_event: EventSink | None = None,
              stop: threading.Event | None = None) -> RankPlan:
    shape = ModelShape.of(loaded.model)
    config.validate()
    spectra = damage = None
    if config.rank is None:  # an unreachable target is refused before minutes of measuring
        target = reduction_target(shape, config)
    if config.strategy == "energy" and config.rank is None:
        subset = None
        if config.whitened_energy and calibration is not None:
            subset = calibration.first_tokens(PLANNING_TOKENS)
        spectra = compute_spectra(loaded, shape, subset, batch_size, config.whitened_energy, on_event)
    if config.strategy == "sensitivity" and config.rank is None:
        if calibration is None:
            raise CalibrationError("the sensitivity strategy measures the model on calibration data; give some")
        from .sensitivity import measure_sensitivity, probe_keeps

        keeps = probe_keeps(shape, config.groups, target)
        damage = measure_sensitivity(loaded, calibration.first_tokens(SENSITIVITY_TOKENS), config.groups, keeps,
                                     batch_size=batch_size, on_event=on_event, stop=stop)
    return build_plan(shape, config, spectra, damage)
