import threading

import torch
from tiny import tiny_sequences

from lillama_core.chat import SamplingConfig, build_prompt, complete, decode, pick_next, stream_chat


def test_same_seed_same_answer_and_greedy_is_deterministic(tiny):
    sampling = SamplingConfig(max_new_tokens=12, temperature=0.9, seed=3)
    a = complete(tiny.model, tiny.tokenizer, "The quick", sampling)
    b = complete(tiny.model, tiny.tokenizer, "The quick", sampling)
    assert a.text == b.text and a.new_tokens > 0
    greedy = SamplingConfig(max_new_tokens=12, temperature=0)
    first, again = (complete(tiny.model, tiny.tokenizer, "fox", greedy) for _ in range(2))
    assert first.text == again.text


def test_cached_decoding_matches_a_full_forward(tiny):
    prompt = tiny_sequences(1, 10)
    greedy = SamplingConfig(max_new_tokens=6, temperature=0, repetition_penalty=1.0)
    tokens = torch.stack(list(decode(tiny.model, prompt, greedy)), dim=1)
    ids = prompt
    for _ in range(6):  # reference: recompute everything each step, no cache
        with torch.no_grad():
            nxt = tiny.model(input_ids=ids).logits[:, -1].argmax(-1)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
    assert torch.equal(tokens, ids[:, 10:])


def test_stream_grows_and_reports_speed(tiny):
    updates = list(stream_chat(tiny.model, tiny.tokenizer, "brown", SamplingConfig(max_new_tokens=8, temperature=0)))
    assert updates[-1].done and not any(u.done for u in updates[:-1])
    lengths = [u.new_tokens for u in updates[:-1]]
    assert lengths == sorted(lengths) and lengths[-1] == updates[-1].new_tokens
    assert updates[-1].tokens_per_s > 0


def test_stop_event_ends_generation_between_tokens(tiny):
    stop = threading.Event()
    seen = []
    for update in stream_chat(tiny.model, tiny.tokenizer, "dog", SamplingConfig(max_new_tokens=50, temperature=0,
                                                                               repetition_penalty=1.0), stop=stop):
        seen.append(update)
        if update.new_tokens == 3:
            stop.set()
    assert seen[-1].done and seen[-1].new_tokens == 3


def test_top_k_one_equals_greedy():
    logits = torch.randn(3, 50)
    seen = torch.zeros(3, 1, dtype=torch.long)
    sampled = pick_next(logits, seen, SamplingConfig(temperature=1.0, top_k=1, repetition_penalty=1.0),
                        torch.Generator().manual_seed(0))
    assert torch.equal(sampled, logits.argmax(-1))


def test_prompt_uses_the_chat_template_when_there_is_one(tiny):
    plain = build_prompt(tiny.tokenizer, "hello")
    tiny.tokenizer.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}"
    templated = build_prompt(tiny.tokenizer, "hello")
    assert tiny.tokenizer.decode(templated[0]).startswith("[user] hello")
    assert templated.shape[1] > plain.shape[1]
