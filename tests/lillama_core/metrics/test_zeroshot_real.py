"""The real SmolLM2-135M-Instruct on a small slice of ARC-Easy: well above chance, as lm-eval scores it."""

import pytest

from lillama_core.metrics.zeroshot import score_tasks

pytestmark = pytest.mark.real_model


def test_smollm2_answers_arc_easy_above_chance(smollm):
    score, = score_tasks(smollm.model, smollm.tokenizer, ["arc_easy"], limit=16)
    assert score.docs == 16 and 0.2 < score.chance < 0.3
    assert score.acc_norm > score.chance + 0.1 and score.acc > score.chance
