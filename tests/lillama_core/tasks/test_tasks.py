import pytest
import torch
from tiny import tiny_llama, tiny_sequences, tiny_whisper

from lillama_core.compress.storage import ActivationStore
from lillama_core.config import CalibrationConfig, EvalConfig, RunConfig
from lillama_core.data.calibration import CalibrationData
from lillama_core.errors import ConfigError
from lillama_core.metrics.evaluate import evaluate
from lillama_core.metrics.perplexity import perplexity
from lillama_core.modeling.loading import describe
from lillama_core.tasks import TASKS_BY_NAME, CausalLM, SpeechSeq2Seq, auto_class_for, task_for
from lillama_core.tasks.speech import speech_metrics

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


@pytest.fixture(scope="module")
def whisper():
    return tiny_whisper()


def test_the_registry_maps_a_config_to_its_task_and_auto_class(llama, whisper):
    assert isinstance(task_for(llama.model.config), CausalLM) and isinstance(llama.task, CausalLM)
    assert isinstance(task_for(whisper.model.config), SpeechSeq2Seq) and isinstance(whisper.task, SpeechSeq2Seq)
    name, mapping = auto_class_for(whisper.model.config)
    assert name == "AutoModelForSpeechSeq2Seq" and mapping[type(whisper.model.config)] is type(whisper.model)
    name, mapping = auto_class_for(llama.model.config)
    assert name == "AutoModelForCausalLM" and mapping[type(llama.model.config)] is type(llama.model)
    assert set(TASKS_BY_NAME) == {"causal-lm", "speech-seq2seq"}
    assert describe(whisper)["task"] == "speech to text (encoder + decoder)"
    assert describe(llama)["task"] == "text generation"


def test_causal_lm_calibrates_on_text_and_scores_perplexity(llama):
    config = RunConfig(calibration=CalibrationConfig(tokens=256, seq_len=32), eval=EvalConfig(tokens=256, seq_len=32))
    data = llama.task.calibrate(llama, config.calibration)
    assert data.sequences.shape == (8, 32) and data.model_inputs(slice(0, 2), CPU).keys() == {"input_ids"}
    assert llama.task.activation_positions(data) == 32
    assert llama.task.student_encoder_states(llama.model, data, [slice(0, 8)], None, CPU, torch.float32) is None
    windows = llama.task.held_out(llama, config)
    record = evaluate(llama.model, llama.tokenizer, llama.task, windows)
    assert record.perplexity == perplexity(llama.model, windows).perplexity and record.wer is None
    assert "sequences × 32 tokens" in llama.task.preview(llama, config.calibration)
    assert llama.task.calibration_warnings(CalibrationConfig()) == []


def test_speech_task_calibrates_on_clips_and_scores_word_error_rate(whisper):
    config = RunConfig(calibration=CalibrationConfig(tokens=8 * 16, seq_len=16, batch_size=4))
    data = whisper.task.calibrate(whisper, config.calibration)
    assert data.model_inputs(slice(0, 2), CPU).keys() == {"input_features", "decoder_input_ids"}
    assert whisper.task.activation_positions(data) == 50  # 100 mel frames, halved by the encoder's stride
    assert whisper.task.calibration_warnings(config.calibration)  # synthetic clips: not a keepable student
    states = whisper.task.student_encoder_states(whisper.model, data, [slice(0, 4), slice(4, 8)],
                                                 ActivationStore.choose("host", CPU, 0, None), CPU, torch.float32)
    with torch.no_grad():
        expected = whisper.model.get_encoder()(data.inputs["input_features"]).last_hidden_state
    torch.testing.assert_close(states, expected, rtol=1e-4, atol=1e-4)
    reference = whisper.task.held_out(whisper, config)
    record = evaluate(whisper.model, whisper.tokenizer, whisper.task, reference, 4, speed_batches=(1, 16))
    raw = speech_metrics(whisper.model, reference, whisper.tokenizer, 4)
    assert record.wer == raw["wer"] == 0 and record.perplexity == raw["perplexity"]  # the teacher vs itself
    assert record.wer_reference == "teacher transcripts" and record.clips == 8
    assert record.generate_tokens_per_s is None  # no text-generation speed for a speech model


def test_speech_scored_alone_needs_true_texts(whisper):
    with pytest.raises(ConfigError, match="true texts"):
        whisper.task.held_out(whisper, RunConfig(), standalone=True)


def test_calibration_inputs_follow_their_rows():
    data = CalibrationData(tiny_sequences(4, 8), "x", 0, {"extra": torch.arange(4.0)}, sequence_input="decoder_ids")
    picked = data.select(torch.tensor([3, 1]))
    assert picked.inputs["extra"].tolist() == [3.0, 1.0] and picked.sequence_input == "decoder_ids"
