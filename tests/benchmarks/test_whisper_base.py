"""The CTranslate2 reader behind the Whisper benchmark (the converted model itself is checked by the
benchmark: Whisper-base transcribes espeak-ng speech almost word for word)."""

import struct
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.whisper_base import read_ct2  # noqa: E402
from lillama_core.errors import ModelLoadError  # noqa: E402


def _string(text: str) -> bytes:
    data = text.encode() + b"\0"
    return struct.pack("<H", len(data)) + data


def _ct2(tensors: dict[str, np.ndarray], aliases: dict[str, str], version: int = 6) -> bytes:
    codes = {np.dtype(np.float32): 0, np.dtype(np.int8): 1, np.dtype(np.float16): 4}
    out = struct.pack("<I", version) + _string("WhisperSpec") + struct.pack("<II", 3, len(tensors))
    for name, value in tensors.items():
        raw = value.tobytes()
        out += _string(name) + struct.pack("<B", value.ndim) + struct.pack(f"<{value.ndim}I", *value.shape)
        out += struct.pack("<BI", codes[value.dtype], len(raw)) + raw
    out += struct.pack("<I", len(aliases))
    for alias, target in aliases.items():
        out += _string(alias) + _string(target)
    return out


def test_tensors_shapes_types_and_aliases_are_read_back():
    weight = np.arange(6, dtype=np.float16).reshape(2, 3)
    flag = np.array(1, dtype=np.int8)
    tensors = read_ct2(_ct2({"decoder/embeddings/weight": weight, "decoder/pre_norm": flag},
                            {"decoder/projection/weight": "decoder/embeddings/weight"}))
    assert np.array_equal(tensors["decoder/embeddings/weight"], weight)
    assert tensors["decoder/embeddings/weight"].dtype == np.float16 and tensors["decoder/pre_norm"] == 1
    assert tensors["decoder/projection/weight"] is tensors["decoder/embeddings/weight"]
    with pytest.raises(ModelLoadError, match="format 5"):
        read_ct2(_ct2({}, {}, version=5))
