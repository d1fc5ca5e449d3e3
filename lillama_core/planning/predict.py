"""What a plan will cost in quality, predicted before any run: pure maths on measurements already taken.

Training-free damage: each layer's measured KL at a few kept shares (sensitivity.py) is interpolated at the
share the plan keeps in that layer, and the layers' damages are added (first order: each probe compressed one
layer alone). The interpolation is a power law in the removed share between measured rungs and linear from
dense to the first rung; its uncertainty is measured by leaving each interior rung out and predicting it from
the others.

Perplexity after distillation: log(student / teacher perplexity) = a · D^b, with D the plan's training-free
damage, fitted on finished runs of the same model; its uncertainty is the leave-one-out error of that fit.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from .ranks import ModelShape, _damage_ladder

MIN_KL = 1e-9  # nats; a rung below this counts as no damage for the log-log interpolation


def layer_keeps(shape: ModelShape, ranks: dict[str, int], layers: Iterable[int],
                groups: Iterable[str]) -> dict[int, float]:
    """Share of each layer's weights (its linear modules in `groups`) that a plan keeps, as the probes count it.

    Args:
        shape: the model.
        ranks: module name -> rank (absent: dense).
        layers: the layers to report.
        groups: the module groups the damage was measured on.

    Returns:
        {layer: kept share in (0, 1]}; 1.0 for a dense layer (and a rank that saves nothing counts as dense).
    """
    groups, keeps = set(groups), {}
    for layer in layers:
        modules = [m for m in shape.modules if m.layer == layer and m.group in groups]
        before = sum(m.dense_params for m in modules)
        after = sum(min(m.lowrank_params(ranks[m.name]), m.dense_params) if m.name in ranks else m.dense_params
                    for m in modules)
        keeps[layer] = after / before if before else 1.0
    return keeps


def _power_law(near: tuple[float, float], far: tuple[float, float], keep: float) -> float:
    """KL at `keep` on the power law in the removed share through two positive rungs (near: more kept)."""
    (k_near, d_near), (k_far, d_far) = near, far
    power = math.log(d_far / d_near) / math.log((1 - k_far) / (1 - k_near))
    return d_near * ((1 - keep) / (1 - k_near)) ** power


def interpolate_damage(points: dict[float, float | None], keep: float) -> float:
    """A layer's KL (nats per token) at kept share `keep`, from its measured {kept share: KL}.

    Between two measured shares: a power law in the removed share (linear in log KL against log(1 - keep));
    between dense and the first rung: linear in the removed share (continuing the next segment's steeper power
    law upwards predicted far too little for layers that keep most: SmolLM2's layer 0, see docs/benchmarks.md);
    below the deepest rung: the last segment continued. Measurements are made monotone first (less kept never
    hurts less); a NaN or None probe is unbounded damage.

    Raises:
        ValueError: no measured share.
    """
    if not points:
        raise ValueError("no measured kept shares to interpolate")
    if keep >= 1.0:
        return 0.0
    rungs = _damage_ladder(points)[1:]  # measured (kept share, KL), kept share falling
    if keep >= rungs[0][0]:  # nothing measured between dense and the first rung: the chord, an upper bound
        return rungs[0][1] * (1 - keep) / (1 - rungs[0][0])  # where damage grows faster than the removed share
    index = next((i for i, (k, _) in enumerate(rungs) if k <= keep), len(rungs) - 1)
    near, far = rungs[index - 1], rungs[index]
    if math.isinf(far[1]):
        return math.inf
    if near[1] < MIN_KL:  # no measurable damage at the nearer rung: linear in the kept share
        return near[1] + (far[1] - near[1]) * (near[0] - keep) / (near[0] - far[0])
    return max(_power_law(near, far, keep), near[1])


def interpolation_error(ladder: dict[int, dict[float, float | None]]) -> float | None:
    """How far the interpolation misses a measured rung it did not see: the root mean square of
    log(predicted / measured KL) over every rung with measured rungs on both sides, each left out in turn.

    Returns:
        The error in log units (0.2: about ±22%), or None when no layer has three measured rungs.
    """
    errors = []
    for points in ladder.values():
        finite = {k: v for k, v in points.items() if v is not None and math.isfinite(v) and v >= MIN_KL}
        shares = sorted(finite, reverse=True)
        for left_out in shares[1:-1]:
            rest = {k: v for k, v in finite.items() if k != left_out}
            predicted = interpolate_damage(rest, left_out)
            errors.append(math.log(max(predicted, MIN_KL) / finite[left_out]))
    return math.sqrt(sum(e * e for e in errors) / len(errors)) if errors else None


@dataclass(frozen=True)
class Damage:
    """A plan's predicted training-free damage.

    Attributes:
        total: KL(teacher || student) in nats per token, summed over layers.
        per_layer: layer -> predicted KL at the share it keeps.
        keeps: layer -> kept share.
        log_error: interpolation_error of the ladder (None: not measurable), so total is within about
            total · exp(±log_error) as far as the interpolation goes.
    """

    total: float
    per_layer: dict[int, float]
    keeps: dict[int, float]
    log_error: float | None


def plan_damage(shape: ModelShape, ranks: dict[str, int], ladder: dict[int, dict[float, float | None]],
                groups: Iterable[str]) -> Damage:
    """The training-free damage of a plan from per-layer measurements (see the module docstring).

    Args:
        shape: the model.
        ranks: the plan's module name -> rank.
        ladder: layer -> kept share -> measured KL; layers not in it count no damage.
        groups: the module groups the ladder was measured on.
    """
    keeps = layer_keeps(shape, ranks, ladder, groups)
    per_layer = {layer: interpolate_damage(points, keeps[layer]) for layer, points in ladder.items()}
    return Damage(sum(per_layer.values()), per_layer, keeps, interpolation_error(ladder))


@dataclass(frozen=True)
class QualityFit:
    """log(student / teacher perplexity) = scale · damage^power, fitted on finished runs.

    Attributes:
        scale, power: the fit.
        runs: how many runs it was fitted on.
        loo_error: root mean square leave-one-out error in log perplexity (0.1: about ±10%); None below 2 runs.
    """

    scale: float
    power: float
    runs: int
    loo_error: float | None

    def log_ratio(self, damage: float) -> float:
        """Predicted log(student / teacher perplexity) at a training-free damage (nats per token)."""
        return self.scale * max(damage, 0.0) ** self.power

    def perplexity(self, damage: float, teacher_perplexity: float) -> float:
        return teacher_perplexity * math.exp(self.log_ratio(damage))


def _usable(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    return [(d, y) for d, y in points if math.isfinite(d) and math.isfinite(y) and d > 0 and y > 0]


def _fit_power(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least squares of log y = log scale + power · log d; one point (or one damage): power 1."""
    xs, ys = [math.log(d) for d, _ in points], [math.log(y) for _, y in points]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    power = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / spread if spread > 1e-12 else 1.0
    power = min(max(power, 0.05), 4.0)  # a handful of noisy runs must not give a curve that falls with damage
    return math.exp(mean_y - power * mean_x), power


def fit_quality(points: list[tuple[float, float]]) -> QualityFit | None:
    """Fit the damage -> perplexity curve on finished runs.

    Args:
        points: (training-free damage of the run's plan in nats per token, log(student / teacher perplexity)).
            Points with non-finite values, no damage or a student better than the teacher are left out (the
            power law cannot hold them).

    Returns:
        The fit with its leave-one-out error, or None without a usable point.
    """
    points = _usable(points)
    if not points:
        return None
    scale, power = _fit_power(points)
    loo_error = None
    if len(points) >= 2:
        errors = []
        for i, (d, y) in enumerate(points):
            s, p = _fit_power(points[:i] + points[i + 1:])
            errors.append(s * d**p - y)
        loo_error = math.sqrt(sum(e * e for e in errors) / len(errors))
    return QualityFit(scale, power, len(points), loo_error)


def energy_kept(singular_values, rank: int | None) -> float:
    """Share of a module's (whitened) energy, sum of squared singular values, that the top `rank` keep; for a
    whitened spectrum this is the share of ||W X||^2 on the calibration inputs. None (dense) keeps all of it."""
    energy = [float(s) ** 2 for s in singular_values]
    total = sum(energy)
    if rank is None or not total:
        return 1.0
    return sum(energy[:rank]) / total
