import math

import pytest
import torch
from tiny import tiny_llama

from lillama_core.planning.predict import (
    energy_kept,
    fit_quality,
    interpolate_damage,
    interpolation_error,
    layer_keeps,
    plan_damage,
)
from lillama_core.planning.ranks import ModelShape

POWER_LAW = {keep: 0.5 * (1 - keep) ** 3 for keep in (0.6, 0.4, 0.2, 0.1)}  # KL = 0.5 (removed share)^3


def test_the_interpolation_passes_through_the_measured_rungs_and_is_zero_when_dense():
    for keep, kl in POWER_LAW.items():
        assert interpolate_damage(POWER_LAW, keep) == pytest.approx(kl)
    assert interpolate_damage(POWER_LAW, 1.0) == 0.0


def test_a_power_law_in_the_removed_share_is_recovered_between_and_below_the_rungs():
    for keep in (0.5, 0.3, 0.15, 0.05):
        assert interpolate_damage(POWER_LAW, keep) == pytest.approx(0.5 * (1 - keep) ** 3, rel=1e-6)
    assert interpolation_error({0: POWER_LAW, 1: POWER_LAW}) == pytest.approx(0.0, abs=1e-9)


def test_above_the_first_rung_the_damage_is_the_chord_from_dense():
    assert interpolate_damage(POWER_LAW, 0.8) == pytest.approx(POWER_LAW[0.6] / 2)


def test_less_kept_never_predicts_less_damage_even_from_noisy_rungs():
    noisy = {0.6: 0.2, 0.4: 0.1, 0.2: 0.8}  # the 40% probe came out lower than the 60% one
    values = [interpolate_damage(noisy, k / 100) for k in range(100, 0, -5)]
    assert all(later >= earlier - 1e-12 for earlier, later in zip(values, values[1:], strict=False))
    assert interpolate_damage(noisy, 0.4) == pytest.approx(0.2)


def test_a_probe_that_was_not_finite_is_unbounded_damage():
    assert math.isinf(interpolate_damage({0.6: 0.1, 0.4: float("nan")}, 0.3))
    assert interpolate_damage({0.6: 0.1, 0.4: None}, 0.7) < 0.1


def test_the_interpolation_error_is_measured_on_rungs_left_out():
    bent = {0.6: 0.01, 0.4: 0.5, 0.2: 0.6}  # far from a power law at 40%
    assert interpolation_error({0: bent}) > 0.5
    assert interpolation_error({0: {0.6: 0.1, 0.2: 0.3}}) is None  # no interior rung to leave out


def test_a_plan_is_scored_at_each_layers_kept_share():
    shape = ModelShape.of(tiny_llama(layers=3).model)
    ladder = {layer: {0.6: 0.1 * (layer + 1), 0.4: 0.3 * (layer + 1)} for layer in range(3)}
    groups = ["attention", "mlp"]
    assert plan_damage(shape, {}, ladder, groups).total == 0.0
    layer_1 = [m for m in shape.modules if m.layer == 1]
    ranks = {m.name: m.rank_for_keep(0.4) for m in layer_1}
    damage = plan_damage(shape, ranks, ladder, groups)
    assert damage.keeps[0] == 1.0 and damage.keeps[1] == pytest.approx(0.4, abs=0.02)
    assert damage.total == pytest.approx(0.6, rel=0.1) and damage.per_layer[0] == 0.0
    assert layer_keeps(shape, {layer_1[0].name: layer_1[0].full_rank}, [1], groups)[1] == 1.0  # saves nothing


def test_the_quality_fit_recovers_a_power_law_with_no_leave_one_out_error():
    points = [(d, 0.3 * d**0.7) for d in (0.05, 0.2, 0.5, 1.0, 3.0)]
    fit = fit_quality(points)
    assert fit.scale == pytest.approx(0.3) and fit.power == pytest.approx(0.7)
    assert fit.runs == 5 and fit.loo_error == pytest.approx(0.0, abs=1e-9)
    assert fit.perplexity(2.0, 40.0) == pytest.approx(40.0 * math.exp(0.3 * 2.0**0.7))


def test_the_leave_one_out_error_grows_with_the_scatter_and_needs_two_runs():
    clean = fit_quality([(d, 0.3 * d) for d in (0.1, 0.5, 1.0, 2.0)])
    scattered = fit_quality([(d, 0.3 * d * f) for d, f in zip((0.1, 0.5, 1.0, 2.0), (1.5, 0.7, 1.3, 0.8),
                                                                  strict=True)])
    assert scattered.loo_error > clean.loo_error + 0.05
    one = fit_quality([(0.5, 0.2), (float("nan"), 1.0), (0.3, -0.1)])  # unusable points are left out
    assert one.runs == 1 and one.power == 1.0 and one.loo_error is None
    assert fit_quality([]) is None


def test_the_energy_kept_is_the_share_of_squared_singular_values():
    values = torch.tensor([3.0, 2.0, 1.0])
    assert energy_kept(values, 1) == pytest.approx(9 / 14)
    assert energy_kept(values, None) == 1.0 and energy_kept(values, 3) == pytest.approx(1.0)
