"""The planning strategies, each registered once: its name and label, what it measures on the teacher
(nothing, weight spectra, or per-layer sensitivity) and how many calibration tokens that takes, whether
a fixed rank applies, and the function that allocates ranks. make_plan, build_plan, the CLI and the app
read this registry instead of naming strategies."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

import torch

from ..config import PlanConfig, Strategy
from ..errors import RankPlanError
from ..registry import Registry
from .ranks import (
    ModelShape,
    ModuleShape,
    _largest_rank_meeting,
    energy_plan,
    layer_order_plan,
    sensitivity_plan,
    uniform_rank_plan,
)

SPECTRA_TOKENS = 16_384  # whitened spectra need far fewer tokens than distillation
SENSITIVITY_TOKENS = 2048  # covariances for the probes; the KL itself is measured on two sequences


class Measurement(StrEnum):
    """What a strategy measures on the teacher before it allocates."""

    NOTHING = "nothing"
    SPECTRA = "spectra"  # singular values of every linear; whitened by its inputs when config.whitened_energy
    SENSITIVITY = "sensitivity"  # output damage of each layer at a few kept shares


@dataclass(frozen=True)
class Allocation:
    """What an allocator reads: the model, the weights to save and the measurements."""

    shape: ModelShape
    target: int  # parameters the plan must save
    modules: list[ModuleShape]  # the modules that may be compressed
    config: PlanConfig
    spectra: dict[str, torch.Tensor] | None = None  # module name -> singular values (Measurement.SPECTRA)
    damage: dict[int, dict[float, float]] | None = None  # layer -> kept share -> KL (Measurement.SENSITIVITY)


Allocator = Callable[[Allocation], dict[str, int]]


@dataclass(frozen=True)
class PlanningStrategy:
    name: str
    label: str  # shown in the app
    measures: Measurement
    allocate: Allocator  # module name -> rank meeting `Allocation.target`
    fixed_rank: bool  # whether a fixed rank for every module (PlanConfig.rank) may replace the target

    def tokens(self, config: PlanConfig) -> int:
        """Calibration tokens measuring reads for `config`; 0 when it needs none (a fixed rank, plain spectra)."""
        if config.rank is not None or self.measures is Measurement.NOTHING:
            return 0
        if self.measures is Measurement.SENSITIVITY:
            return SENSITIVITY_TOKENS
        return SPECTRA_TOKENS if config.whitened_energy else 0

    def measuring(self, config: PlanConfig) -> str:
        """What measuring for `config` does, in words for a notice; empty when it reads no calibration data."""
        if not self.tokens(config):
            return ""
        what = "layer sensitivity" if self.measures is Measurement.SENSITIVITY else "whitened spectra"
        return f"measuring {what} on a slice of the calibration set…"


_STRATEGIES: Registry[PlanningStrategy] = Registry("strategy")


def register_strategy(name: str, label: str, measures: Measurement = Measurement.NOTHING,
                      fixed_rank: bool = False) -> Callable[[Allocator], Allocator]:
    """Decorator: register `allocate` as the strategy `name` (a later registration replaces it)."""

    def register(allocate: Allocator) -> Allocator:
        _STRATEGIES.add(name, PlanningStrategy(name, label, measures, allocate, fixed_rank))
        return allocate

    return register


def strategy_named(name: str) -> PlanningStrategy:
    """The registered strategy `name`.

    Raises:
        ConfigError: no strategy has that name.
    """
    return _STRATEGIES[name]


def all_strategies() -> list[PlanningStrategy]:
    """Every registered strategy, built-ins first in the order the app offers them."""
    return _STRATEGIES.values()


@register_strategy(Strategy.SENSITIVITY, "Sensitivity (measured: spare the layers that hurt most)",
                   Measurement.SENSITIVITY)
def _sensitivity(a: Allocation) -> dict[str, int]:
    if a.damage is None:
        raise RankPlanError("the sensitivity strategy needs measured layer sensitivities")
    return sensitivity_plan(a.shape, a.target, a.modules, a.damage)


@register_strategy(Strategy.ENERGY, "Energy (rank where the spectrum needs it)", Measurement.SPECTRA,
                   fixed_rank=True)
def _energy(a: Allocation) -> dict[str, int]:
    if a.spectra is None:
        raise RankPlanError("the energy strategy needs the spectra of the weights")
    return energy_plan(a.shape, a.target, a.modules, a.spectra)


@register_strategy(Strategy.UNIFORM, "Uniform rank", fixed_rank=True)
def _uniform(a: Allocation) -> dict[str, int]:
    return _largest_rank_meeting(a.shape, a.target, lambda r: uniform_rank_plan(a.shape, r, a.modules))


@register_strategy(Strategy.BOTTOM, "Bottom-first layers")
def _bottom(a: Allocation) -> dict[str, int]:
    return layer_order_plan(a.shape, a.target, a.modules, a.config.layer_keep, from_top=False)


@register_strategy(Strategy.TOP, "Top-first layers")
def _top(a: Allocation) -> dict[str, int]:
    return layer_order_plan(a.shape, a.target, a.modules, a.config.layer_keep, from_top=True)
