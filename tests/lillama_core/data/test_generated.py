import threading

import pytest
import torch
from tiny import SAMPLE_TEXT, tiny_llama
from torch import nn

from lillama_core.config import CalibrationConfig
from lillama_core.data.calibration import CalibrationData, load_calibration
from lillama_core.data.generated import PROMPT_TOKENS, generated_rows, self_generate
from lillama_core.errors import ConfigError, RunStopped


@pytest.fixture(scope="module")
def loaded():
    return tiny_llama()


@pytest.fixture(scope="module")
def data(loaded, tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(SAMPLE_TEXT * 4)
    return load_calibration(CalibrationConfig(source=str(path), tokens=6 * 24, seq_len=24), loaded.tokenizer)


def test_the_teacher_continues_the_first_rows_after_their_prompt_and_leaves_the_rest(loaded, data):
    before = data.sequences.clone()
    out = self_generate(loaded.model, data, 0.5, seed=1)
    assert out.sequences.shape == data.sequences.shape and out.sequences.dtype == torch.long
    assert torch.equal(data.sequences, before)  # the input is not changed
    assert torch.equal(out.sequences[3:], before[3:])  # rows past the share stay real text
    assert torch.equal(out.sequences[:3, :PROMPT_TOKENS], before[:3, :PROMPT_TOKENS])
    assert all(not torch.equal(out.sequences[i, PROMPT_TOKENS:], before[i, PROMPT_TOKENS:]) for i in range(3))
    assert out.source == data.source and out.pool_tokens == data.pool_tokens


def test_generation_is_seeded(loaded, data):
    first, again = (self_generate(loaded.model, data, 1.0, seed=3) for _ in range(2))
    other = self_generate(loaded.model, data, 1.0, seed=4)
    assert torch.equal(first.sequences, again.sequences)
    assert not torch.equal(first.sequences, other.sequences)


def test_the_rows_are_what_the_model_writes(data):
    """A teacher whose every next-token distribution is one token writes nothing else after the prompt."""
    loaded = tiny_llama()
    hidden, vocab = loaded.model.config.hidden_size, loaded.model.config.vocab_size
    head = nn.Linear(hidden, vocab, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-30.0)
        head.bias[7] = 30.0
    loaded.model.lm_head = head
    out = self_generate(loaded.model, data, 1.0)
    assert (out.sequences[:, PROMPT_TOKENS:] == 7).all()


def test_share_zero_is_the_data_itself_and_shares_are_rounded(loaded, data):
    assert self_generate(loaded.model, data, 0.0) is data
    assert [generated_rows(10, s) for s in (0.0, 0.04, 0.26, 1.0)] == [0, 0, 3, 10]


@pytest.mark.parametrize("share", [-0.1, 1.5, True])
def test_a_share_outside_zero_to_one_is_refused(loaded, data, share):
    with pytest.raises(ConfigError, match="between 0 and 1"):
        self_generate(loaded.model, data, share)
    with pytest.raises(ConfigError, match="between 0 and 1"):
        CalibrationConfig(generated=share).validate()


def test_rows_with_other_inputs_or_too_short_for_a_prompt_are_refused(loaded, data):
    speech = CalibrationData(data.sequences, "clips", 0, inputs={"input_features": torch.zeros(6, 4, 8)})
    with pytest.raises(ConfigError, match="input_features"):
        self_generate(loaded.model, speech, 0.5)
    short = CalibrationData(data.sequences[:, :PROMPT_TOKENS], "text", 0)
    with pytest.raises(ConfigError, match="longer than"):
        self_generate(loaded.model, short, 0.5)


def test_progress_is_reported_and_a_stop_ends_generation(loaded, data, monkeypatch):
    import lillama_core.data.generated as generated

    monkeypatch.setattr(generated, "BATCH_ROWS", 2)
    seen = []
    self_generate(loaded.model, data, 1.0, on_progress=lambda done, total: seen.append((done, total)))
    assert seen == [(2, 6), (4, 6), (6, 6)]
    stop = threading.Event()

    def stop_after_first(done, total):
        stop.set()

    with pytest.raises(RunStopped, match="teacher wrote"):
        self_generate(loaded.model, data, 1.0, on_progress=stop_after_first, stop=stop)
