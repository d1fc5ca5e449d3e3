"""Build a rank plan for a loaded model: measure what the chosen strategy needs (whitened spectra,
per-layer sensitivity), then allocate ranks."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from ..compress.batching import batch_slices
from ..compress.capture import LinearCovariances, block_label, capture_block_inputs, run_block_over
from ..config import PlanConfig
from ..data.calibration import CalibrationData
from ..errors import CalibrationError
from ..events import EventSink, Phase
from ..factorize.svd import spectrum, whitened_spectrum
from ..modeling.discovery import find_blocks, find_linears
from ..modeling.loading import LoadedModel
from ..runtime.offload import resident
from .cache import cached_sensitivity, cached_spectra, measurement_key, stored_sensitivity
from .ranks import ModelShape, RankPlan, build_plan, reduction_target
from .strategies import Measurement, strategy_named


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
            covs = LinearCovariances(block.module, names, device)
            try:
                run_block_over(block.module, hidden, hidden, inputs.kwargs_for(block.index), batches, device,
                               block_label(block))
            finally:
                covs.close()
            for local, cov in covs.means().items():
                weight = block.module.get_submodule(local).weight.detach()
                spectra[f"{block.name}.{local}"] = whitened_spectrum(weight.float(), cov)
        if on_event:
            on_event(Phase(name="spectra", detail=f"layer {block.index + 1}/{len(blocks)}"))
    return spectra


@dataclass
class Measurements:
    """What planning measured on the teacher, kept for the Ranks step's diagnostics and quality prediction.

    Attributes:
        spectra: module name -> singular values (descending; whitened by the module's inputs where measured so),
            from the energy strategy's measurement or the sensitivity probes' decompositions.
        damage: layer -> kept share -> KL in nats per token, at the shares the plan was allocated from.
        ladder: the same at every kept share stored for this model and data (all targets' probes so far).
    """

    spectra: dict[str, torch.Tensor] | None = None
    damage: dict[int, dict[float, float]] | None = None
    ladder: dict[int, dict[float, float]] | None = None


def measure_for_plan(loaded: LoadedModel, config: PlanConfig, calibration: CalibrationData | None = None,
                     batch_size: int = 8, on_event: EventSink | None = None,
                     stop: threading.Event | None = None) -> Measurements:
    """Measure (or read from the cache) what the config's strategy needs on the teacher; nothing for a fixed
    rank or a strategy that measures nothing. Arguments and errors as make_plan's."""
    shape = ModelShape.of(loaded.model)
    config.validate()
    strategy = strategy_named(config.strategy)
    if config.rank is not None:
        return Measurements()
    target = reduction_target(shape, config)  # an unreachable target is refused before minutes of measuring
    tokens = strategy.tokens(config)
    if strategy.measures is Measurement.SPECTRA:
        whitened = config.whitened_energy and bool(tokens) and calibration is not None
        subset = calibration.first_tokens(tokens) if whitened else None
        return Measurements(spectra=cached_spectra(
            measurement_key("spectra", loaded, subset, whitened=whitened),
            lambda: compute_spectra(loaded, shape, subset, batch_size, whitened, on_event),
            _reuse_notice("spectra", on_event)))
    if strategy.measures is Measurement.SENSITIVITY:
        if calibration is None:
            raise CalibrationError(f"the {config.strategy} strategy measures the model on calibration data; give some")
        from . import sensitivity  # looked up at call time, so a test can count the measurements

        keeps = sensitivity.probe_keeps(shape, config.groups, target)
        subset = calibration.first_tokens(tokens)
        key = measurement_key("sensitivity", loaded, subset, groups=sorted(config.groups),
                              probe_sequences=sensitivity.PROBE_SEQUENCES)

        def measure(missing: tuple[float, ...]):
            spectra: dict[str, torch.Tensor] = {}
            damage = sensitivity.measure_sensitivity(loaded, subset, config.groups, missing, batch_size=batch_size,
                                                     on_event=on_event, stop=stop, spectra=spectra)
            return damage, spectra

        damage = cached_sensitivity(key, keeps, measure, _reuse_notice("sensitivity", on_event))
        ladder, spectra = stored_sensitivity(key)
        return Measurements(spectra=spectra, damage=damage, ladder=ladder)
    return Measurements()


def make_plan(loaded: LoadedModel, config: PlanConfig, calibration: CalibrationData | None = None,
              batch_size: int = 8, on_event: EventSink | None = None,
              stop: threading.Event | None = None) -> RankPlan:
    """Measure what the config's strategy needs on the teacher, then allocate ranks (see build_plan).

    Args:
        loaded: the teacher.
        config: the plan settings.
        calibration: sequences to measure on; the strategy reads its first `strategy.tokens(config)` tokens.
        batch_size: sequences per forward while measuring.
        on_event: receives Phase events while measuring.
        stop: set to end the sensitivity measurement early.
    Raises:
        CalibrationError: a strategy measuring sensitivity without calibration data.
        RankPlanError: an unreachable target (checked before any measuring).
        RunStopped: a stop request while measuring sensitivity.
    """
    return plan_from(loaded, config, measure_for_plan(loaded, config, calibration, batch_size, on_event, stop))


def plan_from(loaded: LoadedModel, config: PlanConfig, measurements: Measurements) -> RankPlan:
    """The plan `config` allocates from measurements taken by measure_for_plan (see build_plan)."""
    return build_plan(ModelShape.of(loaded.model), config, measurements.spectra, measurements.damage)


def _reuse_notice(name: str, on_event: EventSink | None):
    """A callback telling `on_event` that a stored measurement is used instead of a new one."""
    if on_event is None:
        return None
    return lambda path: on_event(Phase(name=name, detail=f"reusing the stored measurement {path.name}"))
