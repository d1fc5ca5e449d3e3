"""Measurements a plan is built from (per-layer sensitivity, spectra), kept on disk so they are taken
once per model, calibration data and measuring settings, and shared by the app, the CLI and sweeps. The
calibration rows a teacher wrote (self-calibration) are stored the same way: they too cost minutes and depend
only on the model, the data and the settings.

An entry's name is a fingerprint of everything that changes the measurement: the model (name, source,
dtype, every weight's name and shape and a strided sample of its values, so a different checkpoint under
the same name misses), the exact calibration tensors measured on, the settings that steer the probes and
the device type. Entries are written atomically; an unreadable one counts as a miss and is measured again.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..data.calibration import CalibrationData
from ..modeling.loading import LoadedModel
from ..runtime.atomic import staged_file, write_json
from ..runtime.paths import lillama_home

VERSION = 1  # bump when a measurement's method changes, so older entries are not reused
SAMPLES_PER_WEIGHT = 64


def measurements_root() -> Path:
    """Where entries live: $LILLAMA_MEASUREMENTS, else `measurements/` under the Lillama home folder."""
    return Path(os.environ.get("LILLAMA_MEASUREMENTS") or lillama_home() / "measurements")


def _digest(hasher, tensor: torch.Tensor) -> None:
    hasher.update(f"{tuple(tensor.shape)}{tensor.dtype}".encode())
    if tensor.device.type != "meta":  # an offloaded placeholder has no values to read
        hasher.update(tensor.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())


def model_fingerprint(loaded: LoadedModel) -> str:
    """A hash of the teacher: its name, source and dtype, and each weight's name, shape and values at
    SAMPLES_PER_WEIGHT evenly spaced positions (cheap even for large models, unlike hashing every value)."""
    hasher = hashlib.sha256(f"{loaded.name}|{loaded.source}|{loaded.dtype}".encode())
    for name, param in loaded.model.named_parameters():
        hasher.update(name.encode())
        flat = param.reshape(-1)
        _digest(hasher, flat[:: max(1, flat.numel() // SAMPLES_PER_WEIGHT)])
    return hasher.hexdigest()


def data_fingerprint(calibration: CalibrationData | None) -> str:
    """A hash of every tensor the measurement reads (token ids and, for speech models, audio features)."""
    if calibration is None:
        return "none"
    hasher = hashlib.sha256(calibration.sequence_input.encode())
    _digest(hasher, calibration.sequences)
    for name in sorted(calibration.inputs):
        hasher.update(name.encode())
        _digest(hasher, calibration.inputs[name])
    return hasher.hexdigest()


def measurement_key(kind: str, loaded: LoadedModel, calibration: CalibrationData | None, **settings) -> str:
    """The entry name of one measurement.

    Args:
        kind: what is measured ("sensitivity", "spectra").
        loaded: the teacher.
        calibration: the exact data measured on (None: none).
        settings: everything else that changes the result (groups, probed keeps, whitened); JSON values.

    Returns:
        "<kind>-<hash>".
    """
    record = {"version": VERSION, "model": model_fingerprint(loaded), "data": data_fingerprint(calibration),
              "device": loaded.device.type, "settings": settings}
    return f"{kind}-{hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:32]}"


def read_tensors(path: Path) -> dict[str, torch.Tensor] | None:
    """The tensors of a stored entry (on the CPU), or None when it is missing or unreadable."""
    try:
        return load_file(path)
    except (OSError, SafetensorError):  # missing, or torn by a crash of an older writer
        return None


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Store tensors (any dtype) atomically: a reader sees the old entry or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with staged_file(path) as staged:
        save_file({name: values.detach().cpu().contiguous() for name, values in tensors.items()}, staged)


def _write_spectra(path: Path, spectra: dict[str, torch.Tensor]) -> None:
    write_tensors(path, {name: values.float() for name, values in spectra.items()})


def stored_sensitivity(key: str) -> tuple[dict[int, dict[float, float]], dict[str, torch.Tensor] | None]:
    """Everything stored under a sensitivity `key`: the damage at every kept share probed so far (any target's)
    and the probed modules' whitened singular values.

    Returns:
        ({layer: {kept share: KL in nats}} (empty when nothing is stored), {module name: singular values} or None
        for an entry written before spectra were kept).
    """
    root = measurements_root()
    try:
        stored = {int(layer): {float(k): v for k, v in levels.items()}
                  for layer, levels in json.loads((root / f"{key}.json").read_text()).items()}
    except (OSError, ValueError, AttributeError):  # none yet, or torn
        stored = {}
    return stored, read_tensors(root / f"{key}.safetensors")


SensitivityMeasure = Callable[[tuple[float, ...]], tuple[dict[int, dict[float, float]], dict[str, torch.Tensor]]]


def cached_sensitivity(key: str, keeps: tuple[float, ...], measure: SensitivityMeasure,
                       on_hit: Callable[[Path], None] | None = None) -> dict[int, dict[float, float]]:
    """The damage at `keeps` stored under `key`; kept shares not stored yet are measured and added, so plans for
    other targets (a sweep's levels probe deeper shares) reuse what is there. The probes' whitened spectra are
    stored beside it (`stored_sensitivity` reads both); an entry without them is measured again in full once.

    Args:
        key: from measurement_key, without the keeps.
        keeps: the kept shares to probe.
        measure: measures the given kept shares, returning (damage, spectra); what it raises (a stop request)
            passes through, unstored.
        on_hit: told the entry's path when nothing had to be measured.

    Returns:
        {layer: {kept share: KL in nats}} for exactly `keeps`; a NaN probe comes back as None, as build_plan accepts.
    """
    path = measurements_root() / f"{key}.json"
    stored, spectra = stored_sensitivity(key)
    missing = tuple(k for k in keeps if not stored or any(k not in levels for levels in stored.values()))
    if spectra is None and stored:  # an older entry: probe its shares again so the diagnostics get spectra
        missing = tuple(sorted(set(keeps) | {k for levels in stored.values() for k in levels}, reverse=True))
    if missing:
        damage, spectra = measure(missing)
        for layer, levels in damage.items():
            stored.setdefault(layer, {}).update(levels)
        _write_spectra(path.with_suffix(".safetensors"), spectra)
        write_json(path, {str(layer): {repr(k): v for k, v in levels.items()} for layer, levels in stored.items()})
    elif on_hit:
        on_hit(path)
    return {layer: {k: levels[k] for k in keeps} for layer, levels in stored.items()}


def cached_spectra(key: str, measure: Callable[[], dict[str, torch.Tensor]],
                   on_hit: Callable[[Path], None] | None = None) -> dict[str, torch.Tensor]:
    """The singular values stored under `key`, or `measure()`'s, stored for next time.

    Args:
        key: from measurement_key.
        measure: takes the measurement on a miss.
        on_hit: told the entry's path when the stored one is used.

    Returns:
        {module name: singular values}.
    """
    path = measurements_root() / f"{key}.safetensors"
    spectra = read_tensors(path)
    if spectra is not None:
        if on_hit:
            on_hit(path)
        return spectra
    spectra = measure()
    _write_spectra(path, spectra)
    return spectra
