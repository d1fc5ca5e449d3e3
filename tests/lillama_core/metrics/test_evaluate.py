import math

import torch
import torch.nn.functional as F
from tiny import SAMPLE_TEXT, tiny_sequences

from lillama_core.metrics.evaluate import evaluate
from lillama_core.metrics.perplexity import eval_windows, perplexity
from lillama_core.metrics.speed import generation_speed, model_size
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


def test_evaluate_is_the_task_score_plus_speed_and_size(tiny):
    windows = tiny_sequences(2, 16)
    record = evaluate(tiny.model, tiny.tokenizer, tiny.task, windows, speed_batches=(1,))
    assert record.perplexity == perplexity(tiny.model, windows).perplexity
    assert record.tokens_scored == 2 * 15 and record.parameters == count_parameters(tiny.model)
    assert record.generate_tokens_per_s > 0 and record.prefill_tokens_per_s > 0
    assert record.generate_tokens_per_s_b16 is None and record.wer is None  # not measured: None, left out
    assert "wer" not in record.to_dict() and "generate_tokens_per_s_b16" not in record.to_dict()
