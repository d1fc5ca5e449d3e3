"""Tiny random-weight models and a byte-level tokenizer for fast engine tests."""

from __future__ import annotations

import functools

import torch

from lillama_core.models import LoadedModel

SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog. A low-rank matrix stores fewer numbers than a dense one. "
    "Distillation teaches a small student to copy a large teacher, one layer at a time. "
) * 8


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([SAMPLE_TEXT], trainer)
    return tok.to_str()


def tiny_tokenizer():
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
                                   eos_token="<eos>", pad_token="<pad>")


def tiny_llama(layers: int = 2, hidden: int = 64, seed: int = 0, **overrides) -> LoadedModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **overrides)
    model = LlamaForCausalLM(config).eval()
    return LoadedModel(model, tokenizer, "tiny-llama", "random", torch.device("cpu"), torch.float32)


def tiny_sequences(n: int = 12, seq_len: int = 32, vocab: int = 300, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, vocab, (n, seq_len), generator=torch.Generator().manual_seed(seed))
