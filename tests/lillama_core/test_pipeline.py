"""The end-to-end recipe: lengths checked before any work, and a model's failing forward named in one line."""

import dataclasses
import math

import pytest
import torch
from tiny import SAMPLE_TEXT, fail_in, tiny_opt
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from lillama_core.config import RunConfig
from lillama_core.errors import ConfigError, ModelForwardError
from lillama_core.events import Phase
from lillama_core.modeling.shipped import LowRankLinear
from lillama_core.pipeline import run_pipeline


@pytest.fixture
def small_config(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(SAMPLE_TEXT * 20)
    config = RunConfig()
    config.model.name, config.model.device = "tiny", "cpu"
    config.calibration.source, config.calibration.tokens, config.calibration.seq_len = str(text), 256, 32
    config.calibration.batch_size = 4
    config.eval.text, config.eval.tokens, config.eval.seq_len = str(text), 256, 48
    config.plan.strategy, config.plan.reduction = "uniform", 0.1
    return config


def test_calibration_longer_than_the_positions_is_refused_before_any_work(small_config):
    small_config.calibration.seq_len = 128
    phases = []
    with pytest.raises(ConfigError, match="seq_len 128 is longer than the 64 positions OPTForCausalLM"):
        run_pipeline(small_config, loaded=tiny_opt(64), on_event=lambda e: phases.append(getattr(e, "name", "")))
    assert "calibration" not in phases and "plan" not in phases


def test_an_eval_window_longer_than_the_positions_is_shortened_with_a_notice(small_config):
    small_config.eval.seq_len = 512
    events = []
    result = run_pipeline(small_config, loaded=tiny_opt(64), on_event=events.append)
    notices = [e.detail for e in events if isinstance(e, Phase) and e.name == "check"]
    assert notices == ["evaluation window shortened from 512 to 64 tokens, the positions OPTForCausalLM was built for"]
    assert result.metrics.eval_seq_len == 64
    assert math.isfinite(result.metrics.student_ppl) and math.isfinite(result.metrics.teacher_ppl)


def _failure(config, loaded, **kwargs) -> ModelForwardError:
    with pytest.raises(ModelForwardError) as caught:
        run_pipeline(config, loaded=loaded, **kwargs)
    error = caught.value
    assert "\n" not in str(error) and "Traceback" in error.traceback_text and "boom" in error.traceback_text
    return error


def test_a_failing_forward_during_capture_names_the_stage(small_config, tiny, monkeypatch):
    fail_in(monkeypatch, torch.nn.Embedding)
    error = _failure(small_config, tiny)
    assert str(error) == "capture failed in LlamaForCausalLM outside its layers: RuntimeError: boom"


def test_a_failing_forward_during_planning_names_the_stage_and_layer(small_config, tiny, monkeypatch):
    small_config.plan.strategy = "sensitivity"
    layer = tiny.model.model.layers[1]
    fail_in(monkeypatch, LlamaDecoderLayer, lambda module, hidden: module is layer)
    error = _failure(small_config, tiny)
    assert str(error) == "planning failed in LlamaForCausalLM at layer 1: RuntimeError: boom"
    assert (error.stage, error.layer, error.model_class) == ("planning", 1, "LlamaForCausalLM")


def test_a_failing_teacher_block_during_distillation_names_its_layer(small_config, tiny, monkeypatch):
    layer = tiny.model.model.layers[2]
    fail_in(monkeypatch, LlamaDecoderLayer, lambda module, hidden: module is layer)
    error = _failure(small_config, tiny)
    assert str(error) == "distillation failed in LlamaForCausalLM at layer 2: RuntimeError: boom"


def test_a_failing_student_block_names_the_layer_being_distilled(small_config, tiny, monkeypatch):
    # the student's blocks are new modules, absent from the teacher: the stage's own layer count places them
    fail_in(monkeypatch, LowRankLinear)
    events = []
    error = _failure(small_config, tiny, on_event=events.append)
    assert str(error) == "distillation failed in LlamaForCausalLM at layer 0: RuntimeError: boom"
    assert events[-1].kind == "run_error" and events[-1].message == str(error)


def test_a_failing_forward_during_evaluation_names_the_stage_and_layer(small_config, tiny, monkeypatch):
    # only evaluation windows are 48 tokens long (calibration: 32)
    fail_in(monkeypatch, LlamaDecoderLayer, lambda module, hidden: hidden.shape[1] == 48)
    error = _failure(small_config, tiny)
    assert str(error) == "evaluation failed in LlamaForCausalLM at layer 0: RuntimeError: boom"


def test_a_failing_forward_during_healing_names_the_stage(small_config, tiny, monkeypatch):
    small_config.heal.tokens = 128
    from lillama_core.compress.heal import heal as real_heal


    def heal_then_fail(student, *args, **kwargs):
        fail_in(monkeypatch, LlamaDecoderLayer, lambda module, hidden: module is student.model.layers[1])
        return real_heal(student, *args, **kwargs)

    monkeypatch.setattr("lillama_core.compress.heal.heal", heal_then_fail)
    error = _failure(small_config, tiny)
    assert str(error) == "healing failed in LlamaForCausalLM at layer 1: RuntimeError: boom"


def test_position_limits_are_read_under_each_name_configs_give_them():
    from types import SimpleNamespace

    from transformers import GPT2Config, MambaConfig, WhisperConfig

    from lillama_core.modeling.positions import position_limit

    assert position_limit(SimpleNamespace(config=GPT2Config(n_positions=32))) == 32
    assert position_limit(SimpleNamespace(config=WhisperConfig(max_target_positions=40))) == 40
    assert position_limit(SimpleNamespace(config=MambaConfig())) is None  # no positions: no limit


def test_the_finished_student_is_packed_unless_told_not_to(small_config, tiny):
    from lillama_core.modeling.shipped import PackedLowRankLinear

    small_config.distill.train = False  # the training-free factors: both runs build the same student
    ids = torch.randint(2, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    logits = {}
    for pack in (True, False):
        small_config.distill.pack = pack
        student = run_pipeline(small_config, loaded=tiny, evaluate=False).run.student
        assert any(isinstance(m, PackedLowRankLinear) for m in student.modules()) == pack
        with torch.no_grad():
            logits[pack] = student(input_ids=ids).logits
    torch.testing.assert_close(logits[True], logits[False])


def test_the_teacher_writes_its_share_of_the_training_data_and_plans_measure_the_real_text(small_config, tiny,
                                                                                          monkeypatch):
    from lillama_core.compress import loop
    from lillama_core.pipeline import calibrate, planning_calibration

    small_config.calibration.generated = 0.5
    small_config.plan.strategy = "sensitivity"
    real = tiny.task.calibrate(tiny, small_config.calibration)
    trained_on = []
    original = loop.Compressor.__init__

    def spy(self, loaded, calibration, *args, **kwargs):
        trained_on.append(calibration.sequences.clone())
        original(self, loaded, calibration, *args, **kwargs)

    monkeypatch.setattr(loop.Compressor, "__init__", spy)
    events = []
    run_pipeline(small_config, loaded=tiny, on_event=events.append, evaluate=False)
    rows = real.sequences.shape[0] // 2
    assert torch.equal(trained_on[0][rows:], real.sequences[rows:])
    assert not torch.equal(trained_on[0][:rows], real.sequences[:rows])
    assert torch.equal(trained_on[0], calibrate(tiny, small_config.calibration).sequences)  # seeded: reproducible
    progress = [e.detail for e in events if isinstance(e, Phase) and "teacher is writing" in e.detail]
    assert progress[0].endswith(f"0 of {rows} sequences") and progress[-1].endswith(f"{rows} of {rows} sequences")
    planned_on = planning_calibration(tiny, small_config)
    assert planned_on is not None
    real_for_plan = dataclasses.replace(small_config.calibration, generated=0.0,
                                        tokens=small_config.plan.calibration_tokens)
    assert torch.equal(planned_on.sequences, tiny.task.calibrate(tiny, real_for_plan).sequences)


def test_rows_the_teacher_wrote_are_stored_and_reused_for_the_same_data_share_and_seed(small_config, tiny,
                                                                                        monkeypatch):
    import lillama_core.pipeline as pipeline

    small_config.calibration.generated = 0.5
    first_events, again_events = [], []
    first = pipeline.calibrate(tiny, small_config.calibration, first_events.append)
    calls = []
    real_generate = pipeline.self_generate
    monkeypatch.setattr(pipeline, "self_generate", lambda *a, **k: calls.append(a) or real_generate(*a, **k))
    again = pipeline.calibrate(tiny, small_config.calibration, again_events.append)
    assert torch.equal(again.sequences, first.sequences) and not calls
    assert any("reusing the calibration text the teacher wrote" in e.detail for e in again_events)
    assert not any("reusing" in e.detail for e in first_events)
    other_seed = pipeline.calibrate(tiny, dataclasses.replace(small_config.calibration, seed=1))
    more = pipeline.calibrate(tiny, dataclasses.replace(small_config.calibration, generated=1.0))
    assert len(calls) == 2 and not torch.equal(other_seed.sequences, first.sequences)
    assert more.sequences.shape == first.sequences.shape and not torch.equal(more.sequences, first.sequences)
