"""Distillation throughput on large random-weight Llama models (about 1B and 7B parameters).

Random weights make the losses meaningless but the work identical to a real checkpoint of the same
shape, so this measures what a user with that model would wait for: seconds per layer, trained
tokens/s, model FLOP utilisation of the layer-local training, and peak accelerator memory of a
bottom-first run against the size of the model's weights.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from lillama_core.compress.loop import Compressor, held_out_count
from lillama_core.config import DistillConfig
from lillama_core.data.calibration import CalibrationData
from lillama_core.events import LayerFinished, Step
from lillama_core.modeling.discovery import count_parameters, find_blocks, weight_bytes
from lillama_core.modeling.loading import LoadedModel
from lillama_core.planning.ranks import ModelShape, RankPlan
from lillama_core.runtime.offload import stream_blocks

from .bench import log
from .common import PeakMemory, environment

# Shapes of TinyLlama-1.1B and Llama-2-7B.
SHAPES = {
    "llama-1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                     num_key_value_heads=4, vocab_size=32000),
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32000),
}
# Dense bf16 matrix rate of the card, for MFU: the datasheet figure where we know it, else None.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def random_llama(shape: str, device: torch.device, dtype: torch.dtype, offload: bool = False,
                 checkpoint: Path | None = None) -> LoadedModel:
    """With `offload`, built in host memory with its blocks streamed to `device` (as ModelConfig.offload).
    With a `checkpoint` folder, saved there first and loaded back as `load_model` loads a local model:
    safetensors memory-mapped, so a block's weights are read from disk only when it first runs."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096)
    if checkpoint is not None:
        LlamaForCausalLM(config).to(dtype).save_pretrained(checkpoint)
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype).eval()
        if not offload:
            model.to(device)
    else:
        with torch.device("cpu" if offload else device):
            model = LlamaForCausalLM(config)
        model.to(dtype).eval()
    if offload:
        stream_blocks(model, [block.module for block in find_blocks(model)], device)
    return LoadedModel(model, None, shape, "random weights", device, dtype)


def bottom_plan(shape: ModelShape, layers: int, keep: float) -> RankPlan:
    """Every attention and MLP linear of the first `layers` blocks at about `keep` of its weights."""
    ranks = {m.name: m.rank_for_keep(keep) for m in shape.modules
             if m.layer < layers and m.group in ("attention", "mlp")}
    return RankPlan(ranks, "bottom", None)


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def run_throughput(shape_name: str, layers: int, tokens: int, seq_len: int, batch_size: int, init: str,
                   device: torch.device, dtype: torch.dtype, keep: float = 0.4, offload: bool = False,
                   from_checkpoint: bool = False) -> dict:
    with tempfile.TemporaryDirectory(prefix="lillama-bench-") as folder:
        checkpoint = Path(folder) if from_checkpoint else None
        return _run_throughput(shape_name, layers, tokens, seq_len, batch_size, init, device, dtype, keep,
                               offload, checkpoint)


def _run_throughput(shape_name: str, layers: int, tokens: int, seq_len: int, batch_size: int, init: str,
                    device: torch.device, dtype: torch.dtype, keep: float, offload: bool,
                    checkpoint: Path | None) -> dict:
    start = time.time()
    loaded = random_llama(shape_name, device, dtype, offload, checkpoint)
    build_seconds = time.time() - start
    shape = ModelShape.of(loaded.model)
    plan = bottom_plan(shape, layers, keep)
    n = tokens // seq_len
    sequences = torch.randint(0, SHAPES[shape_name]["vocab_size"], (n, seq_len),
                              generator=torch.Generator().manual_seed(0))
    calibration = CalibrationData(sequences, "random token ids", sequences.numel())
    finished: list[LayerFinished] = []
    rates: list[float] = []

    def on_event(event):
        if isinstance(event, LayerFinished):
            finished.append(event)
            log(f"  {shape_name} layer {event.layer}: {event.seconds:.1f}s")
        elif isinstance(event, Step) and event.tokens_per_s > 0:
            rates.append(event.tokens_per_s)

    config = DistillConfig(init=init)
    log(f"{shape_name}: {count_parameters(loaded.model) / 1e9:.2f}B parameters, {layers} layers, {tokens} tokens")
    with PeakMemory(device, host=True) as memory:
        result = Compressor(loaded, calibration, plan, config, batch_size, on_event).run()
    train_tokens = (n - held_out_count(n)) * seq_len
    layer_seconds = [e.seconds for e in finished]
    # Training FLOPs per token of one layer: forward + backward (3x) of the student block's linears, once per
    # loss path, plus the attention score products; the teacher's forward pass for the targets is not counted.
    block = [m for m in shape.modules if m.layer == 0]
    student_params = sum(m.lowrank_params(plan.ranks[m.name]) for m in block if m.name in plan.ranks)
    hidden = SHAPES[shape_name]["hidden_size"]
    paths = 2 if config.loss == "joint" else 1
    flops_per_token = paths * 3 * (2 * student_params + 2 * seq_len * hidden)
    mean_layer = sum(layer_seconds) / len(layer_seconds)
    achieved = flops_per_token * train_tokens / mean_layer
    peak = peak_flops(device)
    weights = weight_bytes(loaded.model)
    record = {
        "model": f"{shape_name} (random weights)", "shape": SHAPES[shape_name], "device": str(device),
        "dtype": str(dtype).replace("torch.", ""), "env": environment(device), "params": count_parameters(loaded.model),
        "weight_bytes": weights, "offload": offload, "from_checkpoint": checkpoint is not None,
        "host_start_anon_bytes": memory.host_start.get("anon"), "host_peak_anon_bytes": memory.host_peak.get("anon"),
        "host_peak_file_bytes": memory.host_peak.get("file"),
        "layers_compressed": layers, "keep": keep, "init": init,
        "loss": config.loss,
        "tokens": n * seq_len, "train_tokens_per_layer": train_tokens, "seq_len": seq_len, "batch_size": batch_size,
        "build_seconds": build_seconds, "compress_seconds": result.seconds, "layer_seconds": layer_seconds,
        "distill_tokens_per_s": train_tokens / mean_layer,
        "step_tokens_per_s_median": sorted(rates)[len(rates) // 2] if rates else None,
        "train_flops_per_token_per_layer": flops_per_token, "achieved_flops": achieved,
        "peak_flops": peak, "mfu": achieved / peak if peak else None,
        "peak_allocated_bytes": memory.peak_bytes, "peak_over_weights": memory.peak_bytes / weights,
        "status": result.status,
    }
    log(f"  {shape_name}: {record['distill_tokens_per_s']:,.0f} trained tokens/s per layer, "
        f"{mean_layer:.1f}s/layer, MFU {record['mfu'] or 0:.1%}, peak {memory.peak_bytes / 2**30:.1f} GiB "
        f"for {weights / 2**30:.1f} GiB of weights; host peak {memory.host_peak.get('anon', 0) / 2**30:.1f} GiB own "
        f"+ {memory.host_peak.get('file', 0) / 2**30:.1f} GiB of mapped checkpoint pages")
    del result, loaded
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return record
