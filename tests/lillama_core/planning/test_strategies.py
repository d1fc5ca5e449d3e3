import pytest
from tiny import tiny_llama

import lillama_core.planning.strategies as strategies
from lillama_core.config import PlanConfig, Strategy
from lillama_core.errors import ConfigError, RankPlanError
from lillama_core.planning.ranks import ModelShape, build_plan
from lillama_core.planning.strategies import (
    SENSITIVITY_TOKENS,
    SPECTRA_TOKENS,
    Measurement,
    all_strategies,
    register_strategy,
    strategy_named,
)


@pytest.fixture(scope="module")
def shape():
    return ModelShape.of(tiny_llama(layers=3).model)


def test_every_built_in_strategy_is_registered_once_with_a_label():
    names = [s.name for s in all_strategies()]
    assert names[:len(Strategy)] == list(Strategy)  # the app offers them in the enum's order
    assert all(s.label for s in all_strategies())


def test_each_strategy_says_how_many_calibration_tokens_it_reads():
    assert PlanConfig(strategy="sensitivity").calibration_tokens == SENSITIVITY_TOKENS
    assert PlanConfig(strategy="energy").calibration_tokens == SPECTRA_TOKENS
    assert PlanConfig(strategy="energy", whitened_energy=False).calibration_tokens == 0  # plain spectra: weights
    assert PlanConfig(strategy="energy", rank=8, reduction=None).calibration_tokens == 0  # fixed rank: no measuring
    for name in ("uniform", "bottom", "top"):
        assert not PlanConfig(strategy=name).uses_calibration
    assert PlanConfig(strategy="sensitivity").uses_calibration


def test_the_app_notice_follows_what_is_measured():
    assert "whitened spectra" in strategy_named("energy").measuring(PlanConfig(strategy="energy"))
    assert "sensitivity" in strategy_named("sensitivity").measuring(PlanConfig(strategy="sensitivity"))
    assert strategy_named("uniform").measuring(PlanConfig(strategy="uniform")) == ""


def test_an_unknown_strategy_is_one_config_error():
    with pytest.raises(ConfigError, match="strategy must be one of sensitivity, energy"):
        strategy_named("largest")
    with pytest.raises(ConfigError, match="'largest'"):
        PlanConfig(strategy="largest").validate()


def test_a_strategy_registered_in_a_test_is_usable_by_build_plan(shape, monkeypatch):
    monkeypatch.setattr(strategies, "_STRATEGIES", strategies._STRATEGIES.copy())
    seen = []

    @register_strategy("first-module", "Only the first module")
    def first_module(allocation):
        seen.append(allocation.target)
        return {allocation.modules[0].name: 4}

    assert strategy_named("first-module").measures is Measurement.NOTHING
    plan = build_plan(shape, PlanConfig(strategy="first-module", reduction=0.01, rank_multiple=1))
    assert plan.ranks == {shape.modules[0].name: 4} and plan.strategy == "first-module" and seen[0] > 0
    with pytest.raises(RankPlanError, match="fixed rank"):  # not declared fixed_rank
        build_plan(shape, PlanConfig(strategy="first-module", rank=4, reduction=None))


def test_fixed_ranks_apply_only_to_strategies_that_declare_it(shape):
    assert {s.name for s in all_strategies() if s.fixed_rank} == {"energy", "uniform"}
    for name in ("bottom", "top", "sensitivity"):
        with pytest.raises(RankPlanError, match="fixed rank"):
            build_plan(shape, PlanConfig(strategy=name, rank=4, reduction=None))
