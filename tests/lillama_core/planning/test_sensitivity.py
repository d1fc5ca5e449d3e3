import math

import pytest
import torch
import torch.nn.functional as F
from tiny import overflowing_float16_llama, tiny_sequences

import lillama_core.planning.sensitivity as sensitivity
from lillama_core.config import PlanConfig
from lillama_core.data.calibration import CalibrationData
from lillama_core.errors import NonFiniteError, RankPlanError
from lillama_core.planning.planner import make_plan
from lillama_core.planning.ranks import ModelShape, build_plan, summarize


def _calibration():
    return CalibrationData(tiny_sequences(12, 32), "random", 0)


def test_replaying_recorded_inputs_reproduces_the_teacher_exactly(tiny, monkeypatch):
    """With the probed block left as it is, every probe must see zero divergence: the stand-ins
    replay exactly what the real lower blocks would have produced."""
    monkeypatch.setattr(sensitivity, "compressed_block", lambda block, modules, keep, covs: block)
    damage = sensitivity.measure_sensitivity(tiny, _calibration(), ["attention", "mlp"])
    assert sorted(damage) == [0, 1, 2]
    assert all(abs(v) < 1e-5 for levels in damage.values() for v in levels.values())


def test_compressing_more_hurts_more(tiny):
    damage = sensitivity.measure_sensitivity(tiny, _calibration(), ["attention", "mlp"], keeps=(0.6, 0.1))
    for layer, levels in damage.items():
        assert levels[0.1] > levels[0.6] > 0, (layer, levels)


def test_sensitivity_plan_protects_the_fragile_layer_and_hits_the_target(tiny):
    shape = ModelShape.of(tiny.model)
    damage = {0: {0.6: 5.0, 0.4: 9.0, 0.2: 20.0},  # layer 0 is fragile
              1: {0.6: 0.1, 0.4: 0.2, 0.2: 0.5},
              2: {0.6: 0.1, 0.4: 0.3, 0.2: 0.6}}
    plan = build_plan(shape, PlanConfig(strategy="sensitivity", reduction=0.15), damage=damage)
    summary = summarize(plan, shape)
    assert summary.params_before - summary.params_after >= math.ceil(0.15 * shape.total_params)
    assert summary.reduction < 0.16
    assert plan.layers(shape) == [1, 2]


def test_unreachable_target_for_the_measured_levels(tiny):
    shape = ModelShape.of(tiny.model)
    damage = {i: {0.6: 0.1} for i in range(3)}
    with pytest.raises(RankPlanError, match="cannot be reached"):
        build_plan(shape, PlanConfig(strategy="sensitivity", reduction=0.5), damage=damage)


def test_make_plan_measures_then_plans(tiny):
    plan = make_plan(tiny, PlanConfig(strategy="sensitivity", reduction=0.1), _calibration(), batch_size=4)
    assert summarize(plan, ModelShape.of(tiny.model)).reduction >= 0.1 - 1e-9
    with pytest.raises(Exception, match="calibration"):
        make_plan(tiny, PlanConfig(strategy="sensitivity", reduction=0.1), None)


def test_probe_rungs_deepen_only_when_the_target_needs_room_below_them(tiny):
    shape = ModelShape.of(tiny.model)
    groups = ["attention", "mlp"]
    dense = sum(m.dense_params for m in shape.modules)
    assert sensitivity.probe_keeps(shape, groups, int(0.3 * dense)) == sensitivity.KEEP_LEVELS
    deep = sensitivity.probe_keeps(shape, groups, int(0.85 * dense))  # 15% kept on average
    assert deep[:3] == sensitivity.KEEP_LEVELS and min(deep) <= 0.6 * 0.15


def test_a_target_past_the_default_rungs_is_planned_with_deeper_probes(tiny):
    """Gemma-3's case in miniature: a target that needs every layer below the 20% rung on average."""
    shape = ModelShape.of(tiny.model)
    dense = sum(m.dense_params for m in shape.modules)
    reduction = 0.85 * dense / shape.total_params
    config = PlanConfig(strategy="sensitivity", reduction=reduction)
    with pytest.raises(RankPlanError, match="cannot be reached"):
        build_plan(shape, config, damage=sensitivity.measure_sensitivity(tiny, _calibration(), config.groups))
    plan = make_plan(tiny, config, _calibration(), batch_size=4)
    assert summarize(plan, shape).reduction >= reduction - 1e-9


def test_an_unreachable_target_is_refused_before_anything_is_measured(tiny, monkeypatch):
    def measured(*args, **kwargs):
        raise AssertionError("measured the model for a plan that cannot exist")

    monkeypatch.setattr(sensitivity, "measure_sensitivity", measured)
    with pytest.raises(RankPlanError, match="more than the selected modules can give"):
        make_plan(tiny, PlanConfig(strategy="sensitivity", reduction=0.95), _calibration())


def test_the_one_pass_divergence_equals_the_textbook_kl():
    torch.manual_seed(0)
    teacher, student = torch.randn(2, 5, 300) * 3, torch.randn(2, 5, 300) * 3
    near = teacher + 0.01 * torch.randn_like(teacher)
    reference = sensitivity.NextTokenReference(teacher)
    for logits in (student, near, teacher):
        textbook = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(teacher, -1), log_target=True,
                            reduction="none").sum(-1)
        assert torch.allclose(reference.kl(logits), textbook, atol=1e-5, rtol=1e-4)
    assert reference.kl(teacher).abs().max() < 1e-5 and reference.kl(near).max() < reference.kl(student).min()


def test_a_probe_that_gave_nan_counts_as_the_worst_damage_not_none(tiny):
    # max(0.0, nan) is 0.0: a NaN probe used to make its layer look harmless and go first.
    shape = ModelShape.of(tiny.model)
    damage = {0: {0.6: float("nan"), 0.4: float("nan"), 0.2: float("nan")},
              1: {0.6: 0.1, 0.4: 0.2, 0.2: 0.5},
              2: {0.6: 0.1, 0.4: 0.3, 0.2: 0.6}}
    plan = build_plan(shape, PlanConfig(strategy="sensitivity", reduction=0.15), damage=damage)
    assert plan.layers(shape) == [1, 2]
    damage[0] = {0.6: None, 0.4: None, 0.2: None}  # the same measurement after a trip through JSON
    assert build_plan(shape, PlanConfig(strategy="sensitivity", reduction=0.15), damage=damage).layers(shape) == [1, 2]


def test_float16_overflow_stops_the_probes_with_one_line_naming_the_layer():
    loaded = overflowing_float16_llama()
    with pytest.raises(NonFiniteError, match=r"^layer 1 \(model\.layers\.1\) produced inf/NaN activations in float16: "
                                             r"run with --dtype bfloat16 or float32$"):
        make_plan(loaded, PlanConfig(strategy="sensitivity", reduction=0.1), _calibration(), batch_size=4)


def test_a_stop_ends_the_measurement_between_two_probes_of_one_layer(tiny, monkeypatch):
    import threading

    from lillama_core.errors import RunStopped

    stop, probes = threading.Event(), []
    real = sensitivity.compressed_block

    def probe_then_stop(block, modules, keep, decompositions):
        probes.append(keep)
        stop.set()
        return real(block, modules, keep, decompositions)

    monkeypatch.setattr(sensitivity, "compressed_block", probe_then_stop)
    with pytest.raises(RunStopped, match="measuring layer sensitivity"):
        sensitivity.measure_sensitivity(tiny, _calibration(), ["attention", "mlp"], keeps=(0.6, 0.4, 0.2), stop=stop)
    assert probes == [0.6]  # the first layer's second probe never ran
