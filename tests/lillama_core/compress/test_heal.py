import threading

import pytest
import torch
from tiny import tiny_sequences

from lillama_core.compress.heal import heal, kl_to_teacher
from lillama_core.compress.loop import Compressor
from lillama_core.config import DistillConfig, HealConfig, PlanConfig
from lillama_core.data.calibration import CalibrationData
from lillama_core.errors import ConfigError, RunStopped
from lillama_core.events import StepStage
from lillama_core.planning.planner import make_plan


def _data(seed: int = 0) -> CalibrationData:
    return CalibrationData(tiny_sequences(40, 32, seed=seed), "random", 0)


@pytest.fixture
def student(tiny):
    plan = make_plan(tiny, PlanConfig(strategy="uniform", rank=6, reduction=None))
    return Compressor(tiny, CalibrationData(tiny_sequences(16, 32), "r", 0), plan,
                      DistillConfig(init="svd", train=False), batch_size=4).run().student


def test_kl_is_zero_for_identical_logits_and_positive_otherwise():
    logits = torch.randn(2, 5, 30)
    assert kl_to_teacher(logits, logits).abs() < 1e-6
    assert kl_to_teacher(logits + torch.randn_like(logits), logits) > 0


def test_healing_lowers_the_held_out_kl_and_touches_only_the_factors(tiny, student):
    frozen = {n: p.detach().clone() for n, p in student.named_parameters() if not n.endswith(("A.weight", "B.weight"))}
    events = []
    metrics = heal(student, tiny.model, _data(seed=1), HealConfig(tokens=1024, lr=3e-3),
                   on_event=events.append)
    assert metrics["heal_kl_after"] < 0.9 * metrics["heal_kl_before"]
    assert any(e.kind == "step" and e.stage == StepStage.HEAL for e in events)
    for name, p in student.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
        assert not p.requires_grad


def test_stop_keeps_the_distilled_factors(tiny, student):
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    stop = threading.Event()
    stop.set()
    with pytest.raises(RunStopped):
        heal(student, tiny.model, _data(), HealConfig(tokens=512), stop=stop)
    for name, p in student.named_parameters():
        assert torch.equal(p, before[name])


def test_non_finite_losses_are_skipped_and_reported_and_leave_the_factors(tiny, student, monkeypatch):
    import lillama_core.compress.heal as healing

    real_kl = healing.kl_to_teacher

    def nan_while_training(student_logits, teacher_logits, *rest):
        loss = real_kl(student_logits, teacher_logits, *rest)
        return loss * float("nan") if student_logits.requires_grad else loss

    monkeypatch.setattr(healing, "kl_to_teacher", nan_while_training)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    events = []
    metrics = heal(student, tiny.model, _data(seed=1), HealConfig(tokens=512, lr=3e-3),
                   on_event=events.append)
    steps = [e for e in events if e.kind == "step"]
    assert steps and all(e.skipped for e in steps)
    assert metrics["heal_kl_after"] == metrics["heal_kl_before"]
    for name, p in student.named_parameters():
        assert torch.equal(p, before[name]), name


def test_heal_config_is_validated():
    with pytest.raises(ConfigError):
        HealConfig(tokens=-1).validate()
    with pytest.raises(ConfigError):
        HealConfig(tokens=10, lr=0).validate()


@pytest.mark.parametrize("checkpointing", [True, False])
def test_healing_runs_without_dropout_and_still_checkpoints_layers(checkpointing, monkeypatch):
    # The teacher's logits come from eval mode; dropout on in the student would make it chase noise.
    from tiny import tiny_llama
    from transformers.modeling_layers import GradientCheckpointingLayer

    loaded = tiny_llama(layers=2, attention_dropout=0.5)
    plan = make_plan(loaded, PlanConfig(strategy="uniform", rank=6, reduction=None))
    student = Compressor(loaded, CalibrationData(tiny_sequences(16, 32), "r", 0), plan,
                         DistillConfig(init="svd", train=False), batch_size=4).run().student
    seen, checkpointed = [], []
    original_call = GradientCheckpointingLayer.__call__

    def spy(self, *args, **kwargs):
        if torch.is_grad_enabled():
            seen.extend(m.training for m in self.modules() if m is not self)
            checkpointed.append(self.gradient_checkpointing and self.training)
        return original_call(self, *args, **kwargs)

    monkeypatch.setattr(GradientCheckpointingLayer, "__call__", spy)
    heal(student, loaded.model, _data(seed=1), HealConfig(tokens=256, gradient_checkpointing=checkpointing))
    assert seen and not any(seen)
    assert checkpointed and all(c == checkpointing for c in checkpointed)
    assert not any(m.training for m in student.modules())
