import math

import pytest

from lillama_core.config import PlanConfig
from lillama_core.errors import RankPlanError
from lillama_core.modeling.discovery import count_parameters
from lillama_core.planning.planner import compute_spectra
from lillama_core.planning.ranks import ModelShape, RankPlan, build_plan, summarize, validate_plan


@pytest.fixture
def shape(tiny):
    return ModelShape.of(tiny.model)


def test_shape_lists_every_linear_of_every_block(shape, tiny):
    assert shape.num_layers == 3
    assert len(shape.modules) == 3 * 7
    q = shape.by_name()["model.layers.0.self_attn.q_proj"]
    k = shape.by_name()["model.layers.0.self_attn.k_proj"]
    down = shape.by_name()["model.layers.2.mlp.down_proj"]
    assert (q.in_features, q.out_features, q.group) == (64, 64, "attention")
    assert (k.in_features, k.out_features) == (64, 32)
    assert (down.in_features, down.out_features, down.group, down.layer) == (128, 64, "mlp", 2)
    assert shape.total_params == count_parameters(tiny.model)


def test_accounting_is_exact(shape, tiny):
    plan = RankPlan({"model.layers.0.self_attn.q_proj": 8, "model.layers.1.mlp.down_proj": 10})
    summary = summarize(plan, shape)
    saved = (64 * 64 - 8 * (64 + 64)) + (128 * 64 - 10 * (128 + 64))
    assert summary.params_before == count_parameters(tiny.model)
    assert summary.params_after == summary.params_before - saved
    assert summary.weight_bytes_after == summary.params_after * 4
    layer1 = summary.layers[1]
    assert layer1["params_before"] - layer1["params_after"] == 128 * 64 - 10 * 192
    assert summary.warnings == []


def test_break_even_rank_is_flagged(shape):
    q = shape.by_name()["model.layers.0.self_attn.q_proj"]
    assert q.max_saving_rank == 31  # 32 * 128 == 64 * 64 stores as many weights: no saving
    assert q.lowrank_params(31) < q.dense_params <= q.lowrank_params(32)
    warnings = validate_plan(RankPlan({q.name: 32}), shape)
    assert len(warnings) == 1 and "stores more weights" in warnings[0]


@pytest.mark.parametrize("ranks, message", [
    ({"model.layers.9.mlp.up_proj": 4}, "does not have"),
    ({"model.layers.0.mlp.up_proj": 0}, "at least 1"),
    ({"model.layers.0.mlp.up_proj": -3}, "at least 1"),
    ({"model.layers.0.mlp.up_proj": 4.5}, "whole number"),
    ({"model.layers.0.mlp.up_proj": 65}, "full rank"),
])
def test_invalid_plans_are_rejected(shape, ranks, message):
    with pytest.raises(RankPlanError, match=message):
        validate_plan(RankPlan(ranks), shape)


@pytest.mark.parametrize("strategy", ["uniform", "bottom", "top"])
def test_reduction_targets_are_met_closely(shape, strategy):
    plan = build_plan(shape, PlanConfig(strategy=strategy, reduction=0.15, rank_multiple=1))
    summary = summarize(plan, shape)
    assert summary.params_before - summary.params_after >= math.ceil(0.15 * shape.total_params)
    assert summary.reduction < 0.15 + 0.02


def test_bottom_first_uses_the_lowest_layers_and_top_first_the_highest(shape):
    bottom = build_plan(shape, PlanConfig(strategy="bottom", reduction=0.05, layer_keep=0.3))
    top = build_plan(shape, PlanConfig(strategy="top", reduction=0.05, layer_keep=0.3))
    assert bottom.layers(shape) == [0]
    assert top.layers(shape) == [2]


def test_uniform_rank_leaves_modules_dense_where_the_rank_saves_nothing(shape):
    plan = build_plan(shape, PlanConfig(strategy="uniform", rank=25, reduction=None))
    # k/v (32x64) save only below rank 22; q/o (64x64) below 32; the MLP below 43.
    assert not any("k_proj" in n or "v_proj" in n for n in plan.ranks)
    assert plan.ranks["model.layers.1.self_attn.q_proj"] == 25
    assert plan.ranks["model.layers.1.mlp.down_proj"] == 25


def test_energy_plan_hits_the_target_and_varies_ranks(tiny, shape):
    spectra = compute_spectra(tiny, shape, None, 8, whitened=False)
    plan = build_plan(shape, PlanConfig(strategy="energy", reduction=0.2, rank_multiple=1), spectra)
    summary = summarize(plan, shape)
    assert summary.params_before - summary.params_after >= math.ceil(0.2 * shape.total_params)
    assert summary.reduction < 0.21
    assert len(set(plan.ranks.values())) > 1


def test_overrides_apply_last_and_null_keeps_dense(shape):
    config = PlanConfig(strategy="uniform", rank=16, reduction=None,
                        overrides={"*.layers.0.*": None, "*.layers.2.mlp.down_proj": 4})
    plan = build_plan(shape, config)
    assert not any(".layers.0." in n for n in plan.ranks)
    assert plan.ranks["model.layers.2.mlp.down_proj"] == 4
    with pytest.raises(RankPlanError, match="matches no module"):
        build_plan(shape, PlanConfig(strategy="uniform", rank=16, reduction=None, overrides={"*.nope": 3}))


def test_unreachable_targets_are_user_errors(shape):
    with pytest.raises(RankPlanError, match="more than the selected modules can give"):
        build_plan(shape, PlanConfig(strategy="uniform", reduction=0.9))
    with pytest.raises(RankPlanError, match="saves no weights"):
        build_plan(shape, PlanConfig(strategy="uniform", rank=60, reduction=None, groups=["attention"]))


def test_plan_json_round_trip_and_malformed_json(tmp_path, shape):
    plan = build_plan(shape, PlanConfig(strategy="bottom", reduction=0.1))
    path = tmp_path / "plan.json"
    plan.save(path)
    assert RankPlan.load(path).ranks == plan.ranks
    path.write_text("{\"ranks\": [1, 2")
    with pytest.raises(RankPlanError, match="not valid plan JSON"):
        RankPlan.load(path)
    with pytest.raises(RankPlanError, match="cannot read"):
        RankPlan.load(tmp_path / "missing.json")


@pytest.mark.parametrize("strategy", ["energy", "uniform", "bottom"])
def test_rank_multiples_keep_the_allocation_and_the_target(tiny, shape, strategy):
    spectra = compute_spectra(tiny, shape, None, 8, whitened=False)
    exact = build_plan(shape, PlanConfig(strategy=strategy, reduction=0.2, rank_multiple=1), spectra)
    aligned = build_plan(shape, PlanConfig(strategy=strategy, reduction=0.2), spectra)  # the default: 8
    assert aligned.ranks and all(rank % 8 == 0 for rank in aligned.ranks.values())
    assert set(aligned.ranks) <= set(exact.ranks)
    assert all(abs(aligned.ranks[n] - exact.ranks[n]) < 8 for n in aligned.ranks)  # the nearest multiples
    summary = summarize(aligned, shape)
    assert summary.params_before - summary.params_after >= math.ceil(0.2 * shape.total_params)
    assert summary.reduction < summarize(exact, shape).reduction + 0.02


def test_ranks_below_one_multiple_stay_exact_so_a_deep_target_is_still_met(shape):
    """Raising a rank of 5 to 64 would give back weights the target needs removed."""
    exact = build_plan(shape, PlanConfig(strategy="uniform", reduction=0.6, rank_multiple=1))
    assert max(exact.ranks.values()) < 64
    aligned = build_plan(shape, PlanConfig(strategy="uniform", reduction=0.6, rank_multiple=64))
    assert aligned.ranks == exact.ranks
    summary = summarize(aligned, shape)
    assert summary.params_before - summary.params_after >= math.ceil(0.6 * shape.total_params)
