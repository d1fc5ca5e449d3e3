"""Repetition and length of greedy answers to the seed instructions."""

import pytest

from lillama_core.metrics.generation import (
    answer_quality,
    distinct_n,
    generation_quality,
    longest_repeat,
    seed_instructions,
    words,
)


def test_repetition_measures_on_known_text():
    fresh = words("The cat sat on a mat.")
    looping = words("I like it. I like it. I like it.")
    assert fresh == ["the", "cat", "sat", "on", "a", "mat", "."]
    assert distinct_n(fresh, 2) == 1.0 and longest_repeat(fresh) == 0
    assert distinct_n(looping, 2) == pytest.approx(4 / 11)  # i like / like it / it . / . i, of 11 bigrams
    assert distinct_n(looping, 3) == pytest.approx(4 / 10)
    assert longest_repeat(looping) == 8  # "i like it . i like it ." appears twice, overlapping
    assert distinct_n(["one"], 2) is None
    quality = answer_quality("I like it. I like it.", tokens=12, cap=12)
    assert quality["hit_cap"] and quality["words"] == 8 and quality["longest_repeat"] == 4


def test_seed_instructions_are_a_fixed_spread_with_inputs():
    prompts = seed_instructions(20)
    assert len(prompts) == 20 and len(set(prompts)) == 20
    assert prompts == seed_instructions(20)
    assert any("\n\n" in p for p in prompts)  # instructions that come with an input carry it


def test_generation_quality_of_a_tiny_model(tiny):
    result = generation_quality(tiny.model, tiny.tokenizer, prompts=3, max_new_tokens=12)
    assert result["prompts"] == 3 and len(result["answers"]) == 3
    for answer in result["answers"]:
        assert 0 < answer["tokens"] <= 12 and answer["answer"]
    assert result["tokens"] == pytest.approx(sum(a["tokens"] for a in result["answers"]) / 3)
    assert result["longest_repeat_max"] == max(a["longest_repeat"] for a in result["answers"])
    assert 0 <= result["hit_cap"] <= 1
