"""Generation quality, cheaply: greedy answers to a fixed set of instructions (the shipped Alpaca seed tasks),
measured for repetition (distinct-2/3, longest repeated n-gram) and length. Compressed models tend to grow
repetitive and verbose before their accuracy drops; these numbers show it."""

from __future__ import annotations

import json
import re

from ..chat import SamplingConfig, complete
from ..runtime.paths import ASSETS

SEED_TASKS = ASSETS / "calibration" / "alpaca_seed_tasks.jsonl"
WORD = re.compile(r"\w+|[^\w\s]")


def seed_instructions(count: int = 20) -> list[str]:
    """`count` instructions spread evenly over the seed tasks (the same ones on every call), each with its
    input appended when it has one."""
    records = [json.loads(line) for line in SEED_TASKS.read_text().splitlines() if line.strip()]
    step = max(len(records) // max(count, 1), 1)
    prompts = []
    for record in records[::step][:count]:
        given = record["instances"][0]["input"].strip()
        prompts.append(record["instruction"] + (f"\n\n{given}" if given else ""))
    return prompts


def words(text: str) -> list[str]:
    """Lower-cased words and punctuation marks, the units repetition is counted in."""
    return WORD.findall(text.lower())


def ngrams(units: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(units[i:i + n]) for i in range(len(units) - n + 1)]


def distinct_n(units: list[str], n: int) -> float | None:
    """Distinct n-grams over all n-grams, in [0, 1] (1: nothing repeats); None when shorter than n."""
    grams = ngrams(units, n)
    return len(set(grams)) / len(grams) if grams else None


def longest_repeat(units: list[str]) -> int:
    """Length of the longest n-gram that occurs at least twice (overlaps allowed); 0 when nothing repeats."""
    n = 0
    while len(set(grams := ngrams(units, n + 1))) < len(grams):
        n += 1
    return n


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def answer_quality(text: str, tokens: int, cap: int) -> dict:
    units = words(text)
    return {"tokens": tokens, "words": len(units), "hit_cap": tokens >= cap, "distinct_2": distinct_n(units, 2),
            "distinct_3": distinct_n(units, 3), "longest_repeat": longest_repeat(units)}


def generation_quality(model, tokenizer, prompts: int = 20, max_new_tokens: int = 96) -> dict:
    """Greedy answers of one model to `prompts` seed instructions (chat template when the tokenizer has one).

    Returns means over the answers: distinct_2, distinct_3 (shares in [0, 1]), longest_repeat (words),
    tokens (new tokens per answer) and hit_cap (share of answers cut at max_new_tokens, i.e. that never
    stopped), plus longest_repeat_max and the answers themselves ({"prompt", "answer", ...per-answer
    measures})."""
    greedy = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0, repetition_penalty=1.0)
    answers = []
    for prompt in seed_instructions(prompts):
        update = complete(model, tokenizer, prompt, greedy)
        answers.append({"prompt": prompt, "answer": update.text,
                        **answer_quality(update.text, update.new_tokens, max_new_tokens)})
    summary = {key: _mean([a[key] for a in answers])
               for key in ("distinct_2", "distinct_3", "longest_repeat", "tokens", "hit_cap")}
    return {"prompts": len(answers), "max_new_tokens": max_new_tokens, **summary,
            "longest_repeat_max": max((a["longest_repeat"] for a in answers), default=0), "answers": answers}
