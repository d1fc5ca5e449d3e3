import torch
from tiny import tiny_llama, tiny_sequences

from lillama_core.compress.layer import LayerDistiller, check_interval, feature_loss
from lillama_core.compress.loop import Compressor
from lillama_core.compress.schedule import lr_at
from lillama_core.config import DistillConfig, PlanConfig
from lillama_core.data.calibration import CalibrationData
from lillama_core.planning.ranks import ModelShape, build_plan


def test_feature_loss_is_minimal_for_identical_outputs():
    x = torch.randn(2, 5, 16)
    same = feature_loss(x, x)
    assert torch.isclose(same, -torch.nn.functional.logsigmoid(torch.tensor(1.0)), atol=1e-6)
    assert feature_loss(x + 0.1 * torch.randn_like(x), x) > same
    assert feature_loss(-x, x) > feature_loss(x + 0.1, x)


def test_lr_schedule_warms_up_then_decays_to_a_tenth():
    assert lr_at(0, 100, 1.0, 4, "cosine") < lr_at(3, 100, 1.0, 4, "cosine") < 1.0
    assert abs(lr_at(4, 100, 1.0, 4, "cosine") - 1.0) < 1e-9
    assert abs(lr_at(100, 100, 1.0, 4, "cosine") - 0.1) < 1e-9
    assert lr_at(50, 100, 1.0, 0, "constant") == 1.0


def test_distillation_lowers_the_held_out_layer_loss(tiny):
    calibration = CalibrationData(tiny_sequences(72, 32), "random", 0)
    plan = build_plan(ModelShape.of(tiny.model), PlanConfig(strategy="uniform", rank=6, reduction=None))
    finished = []
    Compressor(tiny, calibration, plan, DistillConfig(init="svd", lr=3e-3, epochs=4, eval_every=4), batch_size=8,
               on_event=lambda e: finished.append(e) if e.kind == "layer_finished" else None).run()
    assert len(finished) == 3
    floor = -torch.nn.functional.logsigmoid(torch.tensor(1.0)).item()  # loss of a perfect match
    for layer in finished:
        assert layer.best_loss - floor < 0.8 * (layer.init_loss - floor), layer
        assert layer.best_step > 0


def test_keep_best_never_ends_worse_than_the_initialisation(tiny):
    calibration = CalibrationData(tiny_sequences(24, 32), "random", 0)
    plan = build_plan(ModelShape.of(tiny.model), PlanConfig(strategy="uniform", rank=6, reduction=None))
    finished = []
    # An absurd learning rate wrecks the factors; keep_best must fall back to the initial state.
    Compressor(tiny, calibration, plan, DistillConfig(lr=5.0, warmup_steps=0, eval_every=1), batch_size=4,
               on_event=lambda e: finished.append(e) if e.kind == "layer_finished" else None).run()
    for layer in finished:
        assert layer.best_loss <= layer.init_loss


def _layer_reports(loaded, calibration, plan, config, batch_size=8):
    finished = []
    Compressor(loaded, calibration, plan, config, batch_size=batch_size,
               on_event=lambda e: finished.append(e) if e.kind == "layer_finished" else None).run()
    return finished


def test_with_attention_dropout_training_still_lowers_the_held_out_loss():
    # Held-out checks in train mode measured dropout noise: 0.3247 -> 0.3247, best step 0, all training discarded.
    loaded = tiny_llama(layers=2, attention_dropout=0.5)
    calibration = CalibrationData(tiny_sequences(72, 32), "random", 0)
    plan = build_plan(ModelShape.of(loaded.model), PlanConfig(strategy="uniform", rank=6, reduction=None))
    for layer in _layer_reports(loaded, calibration, plan, DistillConfig(eval_every=4)):
        assert layer.best_step > 0, layer
        assert layer.best_loss < layer.init_loss, layer


def test_training_steps_run_the_student_without_dropout(monkeypatch):
    # The teacher's targets come from eval mode, so the student is trained on the same deterministic function.
    loaded = tiny_llama(layers=1, attention_dropout=0.5)
    modes = []
    original = LayerDistiller._losses

    def spy(self, rows):
        modes.extend(module.training for module in self.student.modules())
        return original(self, rows)

    calibration = CalibrationData(tiny_sequences(24, 32), "random", 0)
    plan = build_plan(ModelShape.of(loaded.model), PlanConfig(strategy="uniform", rank=6, reduction=None))
    monkeypatch.setattr(LayerDistiller, "_losses", spy)
    _layer_reports(loaded, calibration, plan, DistillConfig(eval_every=1), batch_size=4)
    assert modes and not any(modes)


def test_automatic_held_out_checks_cost_their_share_and_always_check_the_last_step():
    for steps, held, batch in ((4, 2, 8), (485, 32, 8), (6344, 32, 8), (50, 4, 2)):
        interval = check_interval(steps, held, batch, share=0.05)
        checks = 1 + -(-steps // interval)  # the initial state, every interval, and the last step
        cost = checks * held / (3 * batch)  # in optimiser steps
        assert cost <= max(0.05 * steps, 2 * held / (3 * batch)), (steps, interval)
        assert interval <= steps
    assert check_interval(485, 32, 8, share=0.05) == 29
    assert check_interval(485, 32, 8, share=0.2) < 29


def test_held_out_checks_follow_the_automatic_cadence_unless_eval_every_is_given(tiny, monkeypatch):
    calibration = CalibrationData(tiny_sequences(66, 32), "random", 0)  # 4 held out, 62 trained: 31 steps of 2
    plan = build_plan(ModelShape.of(tiny.model), PlanConfig(strategy="uniform", rank=6, reduction=None))
    plan.ranks = {k: r for k, r in plan.ranks.items() if ".layers.0." in k}
    checks = []
    original = LayerDistiller.held_out_loss
    monkeypatch.setattr(LayerDistiller, "held_out_loss", lambda self: checks.append(1) or original(self))
    for config, expected in ((DistillConfig(held_out_share=0.2), 1 + -(-31 // check_interval(31, 4, 2, 0.2))),
                             (DistillConfig(eval_every=10), 1 + 3 + 1)):
        checks.clear()
        _layer_reports(tiny, calibration, plan, config, batch_size=2)
        assert len(checks) == expected, config
