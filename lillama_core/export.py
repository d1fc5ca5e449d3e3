"""Save and load compressed students.

A compressed export is an ordinary transformers folder (safetensors, config.json, tokenizer) whose
config carries the rank map and an `auto_map` to a shipped `modeling_lillama.py`, so stock
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` loads it
(`AutoModelForSpeechSeq2Seq` for Whisper). A merged export
multiplies the factors back into dense weights and needs no custom code at all. Exports are
written to a hidden staging folder and renamed into place, so a half-written export never exists.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from .errors import ExportError
from .factorize.svd import merge_low_rank
from .modeling import shipped
from .modeling.discovery import share_weights_copy
from .modeling.loading import is_speech_seq2seq
from .modeling.quantize import quantize_weights, quantized_modules
from .modeling.shipped import LowRankLinear, set_submodule
from .runtime.finite import json_safe

FORMAT_VERSION = 1
MODELING_FILE = "modeling_lillama.py"
RECORD_FILE = "lillama.json"


def rank_map_of(model: nn.Module) -> dict[str, int]:
    return {name: m.rank for name, m in model.named_modules() if isinstance(m, LowRankLinear)}


def _modeling_source(base: type) -> str:
    """modeling/shipped.py itself plus one line binding the exported class, so exports never drift from
    the code the library uses."""
    source = Path(shipped.__file__).read_text()
    return (f"{source}\n\nfrom {base.__module__} import {base.__name__} as _Base\n\n"
            f"Lillama{base.__name__} = lowrank_subclass(_Base)\n")


def _base_class(model: nn.Module) -> type:
    cls = type(model)
    # A student rebuilt by load_compressed is already our subclass; export against its base.
    return cls.__mro__[1] if cls.__name__ == "Lillama" + cls.__mro__[1].__name__ else cls


def _dense_weight(linear: nn.Module) -> torch.Tensor:
    return merge_low_rank(linear).weight if isinstance(linear, LowRankLinear) else linear.weight


def merged_copy(model: nn.Module) -> nn.Module:
    """A dense copy in the original layout: every LowRankLinear multiplied back into an nn.Linear (float32
    product), and unfused MoE experts stacked back into their fused 3-D weights."""
    dense = share_weights_copy(model)
    for kind, replace in ((shipped.UnfusedExperts, lambda m: m.to_fused(_dense_weight)),
                          (LowRankLinear, merge_low_rank)):
        for name, module in list(dense.named_modules()):
            if isinstance(module, kind):
                set_submodule(dense, name, replace(module))
    for key in ("lillama_rank_map", "auto_map", "lillama_unfused_experts", "lillama_quantization"):
        dense.config.__dict__.pop(key, None)
    return dense


def _check_target(folder: Path, overwrite: bool) -> None:
    if folder.exists() and not overwrite:
        raise ExportError(f"{folder} already exists; choose another folder or allow overwriting")
    if folder.exists() and not folder.is_dir():
        raise ExportError(f"{folder} exists and is not a folder")
    parent = folder.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"cannot create {parent}: {exc.strerror}") from None
    if not os.access(parent, os.W_OK):
        raise ExportError(f"cannot write to {parent}: permission denied")


def _auto_class(config) -> tuple[str, object]:
    """(the transformers Auto class name that builds this config, its config -> model class mapping)."""
    from transformers.models.auto import modeling_auto

    if is_speech_seq2seq(config):
        return "AutoModelForSpeechSeq2Seq", modeling_auto.MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING
    return "AutoModelForCausalLM", modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING


def export_student(student: nn.Module, tokenizer, folder: str | os.PathLike, merge: bool = False,
                   overwrite: bool = False, record: dict | None = None, quantize: str | None = None,
                   feature_extractor=None) -> Path:
    """Write the student (compressed, or merged dense; with `quantize` "int8"/"int4", its linear weights
    stored as integers) with its tokenizer, its audio feature extractor (speech models) and run record."""
    folder = Path(folder).expanduser()
    _check_target(folder, overwrite)
    ranks = {} if merge else rank_map_of(student)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
    try:
        base = _base_class(student)
        model = merged_copy(student) if merge else share_weights_copy(student)
        quantized = {}
        if quantize:
            model = quantize_weights(model, quantize)
            quantized = quantized_modules(model)
        unfused = any(isinstance(m, shipped.UnfusedExperts) for m in model.modules())
        if ranks or quantized or unfused:  # layers stock transformers does not have: shipped code rebuilds them
            model.config.lillama_rank_map = ranks
            model.config.lillama_quantization = quantized
            model.config.lillama_unfused_experts = unfused
            model.config.auto_map = {_auto_class(model.config)[0]: f"{MODELING_FILE[:-3]}.Lillama{base.__name__}"}
            (staging / MODELING_FILE).write_text(_modeling_source(base))
        model.save_pretrained(staging)
        for preprocessor in (tokenizer, feature_extractor):
            if preprocessor is not None:
                preprocessor.save_pretrained(staging)
        meta = {"format_version": FORMAT_VERSION, "merged": merge, "rank_map": ranks, "quantize": quantize,
                **(record or {})}
        (staging / RECORD_FILE).write_text(json.dumps(json_safe(meta), indent=2, default=str, allow_nan=False))
        if folder.exists():
            trash = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            os.replace(folder, trash)
            os.replace(staging, folder)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(staging, folder)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise ExportError(f"could not write {folder}: {exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def load_compressed(folder: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """(student model, tokenizer) from an export folder, compressed or merged, without remote code."""
    from transformers import AutoConfig, AutoTokenizer

    folder = Path(folder).expanduser()
    if not (folder / RECORD_FILE).exists():
        raise ExportError(f"{folder} is not a Lillama export (no {RECORD_FILE})")
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
        kwargs = {"dtype": dtype} if dtype is not None else {}
        auto_class, mapping = _auto_class(config)
        cls = mapping[type(config)]
        if (getattr(config, "auto_map", None) or {}).get(auto_class, "").startswith(MODELING_FILE[:-3]):
            cls = shipped.lowrank_subclass(cls)
        model = cls.from_pretrained(folder, config=config, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as exc:
        raise ExportError(f"could not load {folder}: {str(exc).splitlines()[0]}") from None
    return model.to(device).eval(), tokenizer


def load_feature_extractor(folder: str | os.PathLike):
    """The audio feature extractor saved with a speech model's export, or None for text models."""
    if not (Path(folder) / "preprocessor_config.json").exists():
        return None
    from transformers import AutoFeatureExtractor

    return AutoFeatureExtractor.from_pretrained(folder)


def read_record(folder: str | os.PathLike) -> dict:
    return json.loads((Path(folder) / RECORD_FILE).read_text())
