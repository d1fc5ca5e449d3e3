"""Where a layer's time goes: SmolLM2-135M at 20% on the CPU, phase by phase (LayerFinished.breakdown).

Records, per compressed layer, the engine's own breakdown (teacher targets, covariance, factorisation,
optimiser steps, step events, held-out checks, checkpoint, advancing activations), the distillation
tokens/s inside optimiser steps, the share of the layer's time outside them, and the model FLOP
utilisation against this machine's measured fp32 matmul rate.

FLOPs (Kaplan et al. 2020, "Scaling Laws for Neural Language Models", Table 1): a forward pass costs
2·N + 2·n_ctx·d_attn per token for a block of N weights (the attention score and value products), and
a training step three times that (the backward pass is two forward passes' worth). One distillation
token of one layer is counted as the forward + backward of the student block on both loss paths plus
the teacher block's forward for the target:  2 · 3 · F(student) + F(teacher).  The advance of the
student path and the held-out checks are overhead, not counted.

The plan is the `tuned` recipe's (uniform ranks, first and last layers dense): it needs no sensitivity
probes, so the run measures distillation alone; its layers have the default recipe's shapes. The distillation
settings are the engine's defaults (joint loss: both paths per step), or with `distill="tuned"` that recipe's
(student-input loss: one path per step, so the passes outside the steps weigh twice as much).
"""

from __future__ import annotations

import statistics
import time

import torch

from lillama_core.compress.layer import check_interval
from lillama_core.compress.loop import Compressor, held_out_count
from lillama_core.compress.timing import PHASES, TRAINING, outside_training_share
from lillama_core.config import DistillConfig
from lillama_core.events import LayerFinished
from lillama_core.planning.ranks import ModelShape, RankPlan

from .bench import Bench, Budget, log
from .methods import METHODS


def matmul_peak_flops(size: int = 2048, repeats: int = 5) -> float:
    """This machine's achievable fp32 matmul rate (FLOP/s): the best of `repeats` size x size products."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.matmul(a, b)  # warm-up: thread pool, caches
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def block_forward_flops(shape: ModelShape, layer: int, ranks: dict[str, int], seq_len: int) -> float:
    """Forward FLOPs per token of one block (Kaplan et al. 2020): 2 x its linear weights (low-rank where
    `ranks` says) + 2 x n_ctx x d_attn for the attention products."""
    modules = [m for m in shape.modules if m.layer == layer]
    weights = sum(m.lowrank_params(ranks[m.name]) if m.name in ranks else m.dense_params for m in modules)
    d_attn = next(m.out_features for m in modules if m.name.endswith("q_proj"))
    return 2 * weights + 2 * seq_len * d_attn


def layer_flops_per_token(shape: ModelShape, layer: int, plan: RankPlan, seq_len: int, paths: int) -> float:
    """Distillation FLOPs of one training token of one layer: paths x 3 x F(student) + F(teacher)."""
    return paths * 3 * block_forward_flops(shape, layer, plan.ranks, seq_len) + \
        block_forward_flops(shape, layer, {}, seq_len)


def projected_seconds(layers: list[dict], tokens: int, measured_tokens: int, seq_len: int, batch_size: int,
                      config: DistillConfig) -> float:
    """Distillation seconds at `tokens` from the measured per-phase rates (a projection, not a measurement):
    phases over every token scale with the tokens, factorisation does not, held-out checks scale with
    their count (the initial one and one per check interval, see layer.check_interval) times the held-out
    sequences."""
    def checks_and_rows(total: int) -> tuple[int, int]:
        n = total // seq_len
        held = held_out_count(n)
        steps = -(-(n - held) // batch_size)
        interval = config.eval_every or check_interval(steps, held, batch_size, config.held_out_share)
        return 1 + -(-steps // interval), held

    ratio = tokens / measured_tokens
    checks_then, held_then = checks_and_rows(measured_tokens)
    checks_now, held_now = checks_and_rows(tokens)
    total = 0.0
    for layer in layers:
        b = layer["breakdown"]
        fixed = b.get("factorisation", 0.0) + b.get("checkpoint", 0.0)
        held = b.get("held_out", 0.0) * (checks_now * held_now) / (checks_then * held_then)
        scaled = sum(v for k, v in b.items() if k not in ("factorisation", "checkpoint", "held_out")) * ratio
        total += fixed + held + scaled
    return total


def first_layers(plan: RankPlan, shape: ModelShape, count: int | None) -> RankPlan:
    """The plan cut to its `count` lowest compressed layers (None: all): a shorter run with the same layers."""
    if not count:
        return plan
    layer_of = {m.name: m.layer for m in shape.modules}
    kept = sorted({layer_of[name] for name in plan.ranks})[:count]
    return RankPlan({k: r for k, r in plan.ranks.items() if layer_of[k] in kept}, plan.strategy,
                    plan.target_reduction, plan.model_type)


def run_profile(model: str, reduction: float, budget: Budget, layers_count: int | None = None,
                distill: str = "defaults") -> dict:
    """Compress `model` at `reduction` (the plan's first `layers_count` layers only, when given) with the
    engine's default distillation settings, or the tuned recipe's (`distill`), and return the profile record."""
    bench = Bench(model, budget, device="cpu", dtype="float32")
    peak = matmul_peak_flops()
    log(f"fp32 matmul peak on this machine: {peak / 1e9:.1f} GFLOP/s ({torch.get_num_threads()} threads)")
    recipe = METHODS["tuned"]
    plan, _, _ = bench.plan(recipe.plan_config(reduction))
    full_layers = {m.layer for m in bench.shape.modules if m.name in plan.ranks}
    plan = first_layers(plan, bench.shape, layers_count)
    config = recipe.distill_config() if distill == "tuned" else DistillConfig()
    calibration = bench.calibration()
    finished: list[LayerFinished] = []

    def on_event(event):
        if isinstance(event, LayerFinished):
            finished.append(event)
            log(f"  layer {event.layer}: {event.seconds:.1f}s: "
                + ", ".join(f"{k} {v:.2f}" for k, v in event.breakdown.items()))

    result = Compressor(bench.loaded, calibration, plan, config, budget.batch_size, on_event, seed=budget.seed).run()
    n, seq_len = calibration.sequences.shape
    train_tokens = (n - held_out_count(n)) * seq_len * config.epochs
    paths = 2 if config.loss == "joint" else 1
    shape = bench.shape
    layers = []
    for e in finished:
        flops = layer_flops_per_token(shape, e.layer, plan, seq_len, paths)
        step_seconds = e.breakdown.get(TRAINING, 0.0)
        layers.append({
            "layer": e.layer, "seconds": e.seconds, "breakdown": e.breakdown,
            "outside_training_share": outside_training_share(e.breakdown, e.seconds),
            "step_tokens_per_s": train_tokens / step_seconds if step_seconds else None,
            "layer_tokens_per_s": train_tokens / e.seconds,
            "flops_per_token": flops,
            "mfu": flops * train_tokens / e.seconds / peak,
            "step_mfu": paths * 3 * block_forward_flops(shape, e.layer, plan.ranks, seq_len) * train_tokens
            / step_seconds / peak if step_seconds else None,
        })
    totals = {k: sum(layer["breakdown"].get(k, 0.0) for layer in layers) for k in PHASES}
    layer_seconds = sum(layer["seconds"] for layer in layers)
    record = {
        **bench.base_record(), "method": recipe.name, "target_reduction": reduction, "tokens": calibration.tokens,
        "layers_profiled": len(finished), "train_tokens_per_layer": train_tokens, "seq_len": seq_len,
        "batch_size": budget.batch_size,
        "distill_settings": distill,
        "distill": {"eval_every": config.eval_every, "held_out_share": config.held_out_share,
                    "keep_best": config.keep_best, "loss": config.loss},
        "peak_fp32_flops": peak, "peak_method": "best of 5 torch.matmul 2048x2048 fp32",
        "flops_formula": "paths*3*F(student) + F(teacher), F = 2*weights + 2*n_ctx*d_attn per token (Kaplan 2020)",
        "compress_seconds": result.seconds, "layer_seconds": layer_seconds, "phase_seconds": totals,
        "outside_training_share": 1 - totals[TRAINING] / layer_seconds,
        "step_tokens_per_s_median": statistics.median(x["step_tokens_per_s"] for x in layers),
        "layer_tokens_per_s_median": statistics.median(x["layer_tokens_per_s"] for x in layers),
        "mfu_median": statistics.median(x["mfu"] for x in layers),
        "step_mfu_median": statistics.median(x["step_mfu"] for x in layers),
        # Every layer of the full plan at the profiled layers' mean phases, scaled to the token budget.
        "projected_distill_seconds": {
            str(t): projected_seconds(layers, t, calibration.tokens, seq_len, budget.batch_size, config)
            * len(full_layers) / len(layers) for t in (1_000_000, 13_000_000)},
        "plan_layers": len(full_layers),
        "layers": layers, "status": result.status,
    }
    log(f"  {len(layers)} layers, {layer_seconds:.1f}s; outside optimiser steps "
        f"{record['outside_training_share']:.1%}; " + ", ".join(f"{k} {v:.1f}s" for k, v in totals.items()))
    return record
