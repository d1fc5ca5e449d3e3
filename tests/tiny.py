"""Tiny random-weight models and a byte-level tokenizer for fast engine tests."""

from __future__ import annotations

import functools

import torch

from lillama_core.modeling.loading import LoadedModel

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


_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256)
# Every causal LM family the engine supports, with grouped-query attention, tied embeddings, biases, rotary variants,
# fused projections, MoE experts and a state-space mixer: (config class, model class, config arguments).
ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(_COMMON, tie_word_embeddings=True, attention_bias=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(_COMMON, sliding_window=16)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(_COMMON, tie_word_embeddings=True)),  # q/k/v biases
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(_COMMON, head_dim=16)),  # q/k norms
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(_COMMON, pad_token_id=0, partial_rotary_factor=0.5)),  # fused qkv
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(_COMMON, head_dim=16, sliding_window=8)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(_COMMON, num_local_experts=4, num_experts_per_tok=2)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(_COMMON, head_dim=16, num_experts=4,
                                                                num_experts_per_tok=2, moe_intermediate_size=32)),
    "mamba": ("MambaConfig", "MambaForCausalLM", dict(hidden_size=64, num_hidden_layers=2, state_size=8)),
}


def tiny_family(name: str) -> LoadedModel:
    """A random model of `ARCHITECTURES[name]`, its fused MoE experts unfused as `load_model` does."""
    import transformers

    from lillama_core.modeling.shipped import unfuse_experts

    config_class, model_class, kwargs = ARCHITECTURES[name]
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(vocab_size=len(tokenizer),
                                                                                    **kwargs)).eval()
    unfuse_experts(model)  # fused MoE experts become linears the planner can see
    return LoadedModel(model, tokenizer, name, "random", torch.device("cpu"), torch.float32)


def tiny_sequences(n: int = 12, seq_len: int = 32, vocab: int = 300, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, vocab, (n, seq_len), generator=torch.Generator().manual_seed(seed))


def tiny_whisper(layers: int = 2, hidden: int = 64, seed: int = 0) -> LoadedModel:
    """A random Whisper (encoder and decoder, `layers` blocks each) over 1-second clips of 16 mel bins; weights
    large enough (init_std) that its greedy transcripts differ from clip to clip."""
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    config = WhisperConfig(vocab_size=len(tokenizer), d_model=hidden, encoder_layers=layers, decoder_layers=layers,
                           encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=2 * hidden,
                           decoder_ffn_dim=2 * hidden, num_mel_bins=16, max_source_positions=50,
                           max_target_positions=64, pad_token_id=tokenizer.pad_token_id,
                           eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
                           decoder_start_token_id=tokenizer.eos_token_id, init_std=0.3)
    model = WhisperForConditionalGeneration(config).eval()
    features = WhisperFeatureExtractor(feature_size=16, chunk_length=1)
    return LoadedModel(model, tokenizer, "tiny-whisper", "random", torch.device("cpu"), torch.float32, features)


# A chat template in the style of Gemma's and Mistral's: no system turn, and turns must alternate from the user.
STRICT_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "<{{ m['role'] }}>{{ m['content'] }}{% endfor %}")

def overflowing_float16_llama(layers: int = 3, overflowing_layer: int = 1) -> LoadedModel:
    """A tiny Llama in float16 whose one MLP is scaled (x300) so its activations pass float16's 65504;
    in float32 the same model is finite."""
    loaded = tiny_llama(layers=layers)
    mlp = loaded.model.model.layers[overflowing_layer].mlp
    with torch.no_grad():
        for linear in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            linear.weight.mul_(300.0)
    loaded.model.half()
    loaded.dtype = torch.float16
    return loaded

def tiny_opt(positions: int = 64) -> LoadedModel:
    """A random OPT: learned position embeddings, so a sequence past `positions` is an IndexError."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    config = OPTConfig(vocab_size=len(tokenizer), hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                       num_attention_heads=4, word_embed_proj_dim=64, max_position_embeddings=positions,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.eos_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    return LoadedModel(OPTForCausalLM(config).eval(), tokenizer, "tiny-opt", "random", torch.device("cpu"),
                       torch.float32)


def fail_in(monkeypatch, owner: type, when=lambda module, hidden: True, message: str = "boom") -> None:
    """Make `owner.forward` raise RuntimeError(message) where `when(module, first input)` holds."""
    real = owner.forward

    def forward(self, hidden, *args, **kwargs):
        if when(self, hidden):
            raise RuntimeError(message)
        return real(self, hidden, *args, **kwargs)

    monkeypatch.setattr(owner, "forward", forward)
