import math

import torch
import torch.nn.functional as F
from tiny import SAMPLE_TEXT, tiny_sequences

from lillama_core.metrics.evaluate import eval_windows, evaluate_model, generation_speed, model_size, perplexity
from lillama_core.modeling.discovery import count_parameters


def test_perplexity_is_exp_of_mean_next_token_loss(tiny):
    windows = tiny_sequences(5, 24)
    result = perplexity(tiny.model, windows, batch_size=2)
    with torch.no_grad():
        logits = tiny.model(input_ids=windows).logits[:, :-1]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    assert result.tokens_scored == 5 * 23
    assert math.isclose(result.perplexity, math.exp(nll.item()), rel_tol=1e-4)


def test_windows_are_non_overlapping_and_fixed_size(tiny):
    ids = tiny.tokenizer(SAMPLE_TEXT * 4, add_special_tokens=False)["input_ids"]
    windows = eval_windows(tiny.tokenizer, SAMPLE_TEXT * 4, 200, 32)
    assert windows.shape == (6, 32)
    assert windows.flatten().tolist() == ids[:192]


def test_speed_and_size_numbers(tiny):
    speed = generation_speed(tiny.model, tiny.model.config.vocab_size, batch_size=2, prompt_tokens=8, new_tokens=4)
    assert speed.new_tokens == 4 and speed.generate_tokens_per_s > 0 and speed.prefill_tokens_per_s > 0
    size = model_size(tiny.model)
    assert size.parameters == count_parameters(tiny.model)
    assert size.weight_bytes >= size.parameters * 4


def test_evaluate_model_record(tiny):
    record = evaluate_model(tiny.model, tiny.tokenizer, tiny_sequences(2, 16), speed=False)
    assert record["perplexity"] > 1 and record["parameters"] == count_parameters(tiny.model)
