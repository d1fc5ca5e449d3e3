"""The suites: quality (methods x reductions), ablations (one knob at a time around a base recipe) and
speed/memory (teacher vs students, each measured in its own process)."""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lillama_core.metrics.perplexity import perplexity
from lillama_core.metrics.speed import generation_speed
from lillama_core.modeling.discovery import count_parameters, weight_bytes
from lillama_core.modeling.loading import resolve_device, resolve_dtype
from lillama_core.modeling.packs import pack_low_rank, token_inputs
from lillama_core.modeling.shipped import apply_rank_map
from lillama_core.planning.ranks import ModelShape, build_plan, summarize
from lillama_core.runtime.graphs import GraphDecoder
from lillama_core.runtime.telemetry import synchronize

from .bench import Bench, Budget, log
from .common import ROOT, PeakMemory, environment, maxrss_bytes, rss_bytes, write_record
from .kernels import mean_kernels_per_block
from .methods import PROTECT_LAST, Recipe, recipe
from .throughput import SHAPES, random_llama

# ---- quality ----


def run_quality(models: list[str], reductions: list[float], methods: list[str], budget: Budget,
                device: str, dtype: str, tag: str | None = None, results_dir=None) -> list[dict]:
    records = []
    for model in models:
        bench = Bench(model, budget, device, dtype)
        for method in methods:
            r = recipe(method)
            for reduction in ([0.0] if r.teacher else reductions):
                try:
                    record = bench.run_recipe(r, reduction, extra={"tag": tag} if tag else None)
                except Exception as exc:  # one infeasible point (e.g. 40% of Gemma) must not end the suite
                    log(f"  {model} {method} @ {reduction:.0%} failed: {type(exc).__name__}: {exc}")
                    record = {**bench.base_record(), "method": method, "target_reduction": reduction,
                              "tokens": budget.tokens, "ppl": None, "error": f"{type(exc).__name__}: {exc}"}
                write_record("quality", record, results_dir)
                records.append(record)
        del bench
        gc.collect()
    return records


# ---- ablations ----

# One knob of one config section per axis: axis -> (section, field, type, default values).
KNOBS = {
    "init": ("distill", "init", str, ["svd", "whitened"]),
    "loss": ("distill", "loss", str, ["joint", "teacher", "student"]),
    "lr": ("distill", "lr", float, ["1e-4", "3e-4", "1e-3"]),
    "schedule": ("distill", "schedule", str, ["cosine", "constant"]),
    "epochs": ("distill", "epochs", int, ["1", "2"]),
    "heal": ("heal", "tokens", int, ["0", "16384"]),  # healing tokens after distillation, same calibration tokens
}


def _allocation_variants(base: Recipe, values: list[str] | None) -> list[tuple[str, Recipe, int | None]]:
    """Values: strategy[+L<n>...][+last], e.g. "energy+L0+last" = energy ranks, layers 0 and last kept dense."""
    out = []
    for spec in values or ["uniform", "uniform+L0", "bottom", "bottom+L0", "top", "top+L0", "energy", "energy+L0",
                           "energy+L0+last"]:
        strategy, *protect = spec.split("+")
        overrides = {}
        for item in protect:
            if item == "last":
                overrides.update(PROTECT_LAST)
            elif item.startswith("L") and item[1:].isdigit():
                overrides[f"*.layers.{int(item[1:])}.*"] = None
            else:
                raise SystemExit(f"allocation value {spec!r}: expected strategy[+L<n>][+last]")
        label = spec + (" dense" if protect else "")
        out.append((label, base.with_changes(label, plan={"strategy": strategy, "overrides": overrides}), None))
    return out


def ablation_variants(what: str, base: Recipe, values: list[str] | None, free: bool,
                      model: str) -> list[tuple[str, Recipe, int | None]]:
    """(label, recipe, calibration tokens or None) for one ablation axis."""
    if what in KNOBS:
        section, name, kind, defaults = KNOBS[what]
        out = [(f"{what}={value}", base.with_changes(f"{what}={value}", **{section: {name: kind(value)}}), None)
               for value in values or defaults]
    elif what == "allocation":
        out = _allocation_variants(base, values)
    elif what == "tokens":
        out = [(f"tokens={int(tokens)}", base.with_changes(f"tokens={tokens}"), int(tokens))
               for tokens in values or ["4096", "16384", "65536"]]
    elif what == "method":  # any named recipes side by side, e.g. --values svd,whitened,tuned
        out = [(name, recipe(name), None) for name in values or []]
    else:
        raise SystemExit(f"unknown ablation {what!r}")
    if free:
        out = [(label + " (no training)", r.with_changes(r.name, distill={"train": False}), t) for label, r, t in out]
    return out


def run_ablation(model: str, what: str, reduction: float, base_name: str, values: list[str] | None, free: bool,
                 budget: Budget, device: str, dtype: str, sets: dict | None = None, tag: str | None = None,
                 results_dir=None) -> list[dict]:
    base = recipe(base_name)
    if sets:
        base = base.with_changes(base.name, plan=sets.get("plan"), distill=sets.get("distill"))
    variants = ablation_variants(what, base, values, free, model)
    bench = Bench(model, budget, device, dtype)
    records = []
    teacher = bench.run_teacher()
    for label, r, tokens in variants:
        extra = {"ablation": what, "variant": label, "base": base_name, "training_free": free,
                 "teacher_ppl": teacher["ppl"], **({"tag": tag} if tag else {}), **({"sets": sets} if sets else {})}
        try:
            record = bench.run_recipe(r, reduction, tokens=tokens, label=label, extra=extra)
        except Exception as exc:
            log(f"  {label} failed: {type(exc).__name__}: {exc}")
            record = {**bench.base_record(), "method": label, "target_reduction": reduction, "ppl": None,
                      "error": f"{type(exc).__name__}: {exc}", **extra}
        write_record("ablation", record, results_dir)
        records.append(record)
    return records


# ---- quantization on top ----


QUANT_SPEED = dict(prompt=64, new=32, repeats=3)  # greedy decoding, median of the repeats
QUANT_BATCHES = (1, 16)
QUANT_LAYER = "model.layers.1.mlp.up_proj"  # compressed in the 20% student: a LowRankLinear there, dense in the teacher


def _layer_microseconds(model, name: str, batch: int, repeats: int = 200) -> float:
    """Median wall time in µs of one call of the module `name` on `batch` random tokens (one decoding step)."""
    layer = model.get_submodule(name)
    device, dtype = model.get_input_embeddings().weight.device, model.get_input_embeddings().weight.dtype
    x = torch.randn(batch, 1, layer.in_features, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    times = []
    with torch.no_grad():
        for index in range(repeats + 10):
            synchronize(device)
            start = time.perf_counter()
            layer(x)
            synchronize(device)
            if index >= 10:
                times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def _speed_facts(model, prefix: str) -> dict:
    """Prefill and decoding tokens/s at batch 1 and 16, and one linear layer's time per call ("_b1" keys unsuffixed
    for batch 1, as earlier records have them)."""
    vocab = model.get_input_embeddings().num_embeddings
    facts = {}
    for batch in QUANT_BATCHES:
        key = prefix if batch == 1 else f"{prefix}_b{batch}"
        speed = _median_speed(model, vocab=vocab, batch=batch, **QUANT_SPEED)
        facts.update({f"{key}_generate_tokens_per_s": speed["generate_tokens_per_s"],
                      f"{key}_prefill_tokens_per_s": speed["prefill_tokens_per_s"],
                      f"{key}_layer_us": _layer_microseconds(model, QUANT_LAYER, batch)})
    return facts


def _quantized_facts(model, bench: Bench, prefix: str) -> dict:
    from lillama_core.modeling.quantize import MODES, quantize_weights, serialized_bytes

    facts = {f"{prefix}_bytes": serialized_bytes(model), **_speed_facts(model, prefix)}
    for mode in MODES:
        start = time.time()
        quantized = quantize_weights(model, mode)
        facts[f"{prefix}_{mode}_seconds"] = time.time() - start  # quantizing (HQQ's solver for int4)
        ppl = perplexity(quantized, bench.windows(), bench.budget.eval_batch).perplexity
        facts.update({f"{prefix}_{mode}_bytes": serialized_bytes(quantized), f"{prefix}_{mode}_ppl": ppl,
                      **_speed_facts(quantized, f"{prefix}_{mode}")})
        log(f"  {prefix} {mode}: ppl {ppl:.2f}, {facts[f'{prefix}_{mode}_generate_tokens_per_s']:.1f} tok/s at batch 1")
    return facts


def run_quantize(model: str, method: str, reduction: float, budget: Budget, tag: str | None = None,
                 results_dir=None, device: str = "cpu", dtype: str = "float32") -> dict:
    """Teacher and student, each also weight-only int8 and int4 (torchao kernels): size, perplexity on the same test
    tokens, prefill and decoding speed at batch 1 and 16, and one linear layer's time per call."""
    bench = Bench(model, budget, device, dtype)
    teacher = bench.run_teacher()
    extra = {"teacher_ppl": teacher["ppl"], **_quantized_facts(bench.loaded.model, bench, "teacher"),
             **({"tag": tag} if tag else {})}
    record = bench.run_recipe(recipe(method), reduction, extra=extra,
                              inspect=lambda student: _quantized_facts(student, bench, "student"))
    write_record("quantize", record, results_dir)
    log(f"  int8: teacher {record['teacher_int8_ppl']:.2f}, student {record['student_int8_ppl']:.2f}; "
        f"int4: teacher {record['teacher_int4_ppl']:.2f}, student {record['student_int4_ppl']:.2f}")
    return record


# ---- speed and memory ----


def _median_speed(model, vocab: int, batch: int, prompt: int, new: int, repeats: int,
                  graphs: GraphDecoder | None = None) -> dict:
    """Median tokens/s of `generation_speed` over `repeats` seeds; with `graphs`, through that static-cache
    compiled decoder, whose warm-up (first run only) is reported apart."""
    runs = [generation_speed(model, vocab, batch, prompt, new, seed=i, graphs=graphs) for i in range(repeats)]
    return {"batch_size": batch, "prompt_tokens": prompt, "new_tokens": runs[0].new_tokens,
            "generate_tokens_per_s": statistics.median(r.generate_tokens_per_s for r in runs),
            "prefill_tokens_per_s": statistics.median(r.prefill_tokens_per_s for r in runs),
            **({"warm_up_seconds": runs[0].warm_up_seconds, "compile_mode": graphs.config.mode} if graphs else {})}


def _random_ids(vocab: int, batch: int, length: int, device) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(0)).to(device)


def _median_seconds(run, device, repeats: int) -> float:
    """Median wall time of `run()` over `repeats` calls, each waited on to the end of its device work."""
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def _prefill(model, vocab: int, batch: int, seq: int, repeats: int) -> float:
    device = next(model.parameters()).device
    ids = _random_ids(vocab, batch, seq, device)
    model(input_ids=ids[:, :16], use_cache=False)
    return batch * seq / _median_seconds(lambda: model(input_ids=ids, use_cache=False), device, repeats)


def _random_weight_subject(shape_name: str, r: Recipe, reduction: float, device: str, dtype: str):
    """A random-weight Llama of a large shape, or a student of it: speed depends on shapes, not values. There is
    no data worth measuring sensitivity on, so a student takes the recipe's plan made uniform (same rank
    multiple) and keeps its factors random."""
    device_ = resolve_device(device)
    model = random_llama(shape_name, device_, resolve_dtype(dtype, device_)).model
    if r.teacher:
        return model, {}
    shape = ModelShape.of(model)
    config = r.plan_config(reduction)
    if config.uses_calibration:
        config = dataclasses.replace(config, strategy="uniform")
    plan = build_plan(shape, config)
    apply_rank_map(model, plan.ranks)
    return model, {"reduction": summarize(plan, shape).reduction, "target_reduction": reduction,
                   "rank_multiple": config.rank_multiple, "plan_strategy": config.strategy}


def speed_worker(model_name: str, method: str, reduction: float, budget: Budget, device: str, dtype: str,
                 new_tokens: int, repeats: int, graphs: bool = False, pack: bool = True) -> dict:
    """Measure one model in this (fresh) process: the teacher, or a student of `method` at `reduction`.

    A student is built training-free: distillation changes the factors' values, not their shapes,
    so speed and memory are those of the distilled model. The teacher's dense copies of the
    replaced weights are dropped before measuring, so memory is the student's alone. `model_name` may
    also be a random-weight shape (llama-1b, llama-7b). With `graphs`, batch 1 and 16 decoding are also timed
    through a static KV cache with the decode step compiled (runtime/graphs.py: CUDA graphs on a GPU), warm-up
    seconds and peak memory apart. With `pack` (what the pipeline gives), a student's factors that read one input
    share one A matmul (modeling/packs.py)."""
    r = recipe(method)
    if model_name in SHAPES:
        model, info = _random_weight_subject(model_name, r, reduction, device, dtype)
        model_name = f"{model_name} (random weights)"
    else:
        bench = Bench(model_name, budget, device, dtype)
        info = {}
        if r.teacher:
            model = bench.loaded.model
        else:
            model, summary = bench.build_student(r, reduction)
            info = {"reduction": summary.reduction, "target_reduction": reduction,
                    "rank_multiple": r.plan_config(reduction).rank_multiple}  # "ours" follows the engine's default
            bench.loaded.model = None  # the student keeps only the weights it shares
            bench._calibration.clear()
            bench._spectra.clear()
    packs = pack_low_rank(model, token_inputs(model)) if pack and not r.teacher else []
    gc.collect()
    vocab = model.config.vocab_size
    device_ = next(model.parameters()).device
    record = {"model": model_name, "method": method, "target_reduction": reduction if not r.teacher else 0.0,
              "reduction": info.get("reduction", 0.0), "device": str(device_),
              "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
              "params": count_parameters(model), "weight_bytes": weight_bytes(model), "env": environment(device_),
              "packed": bool(packs), "packs": len(packs), "kernels_per_block": mean_kernels_per_block(model),
              "rss_before_bytes": rss_bytes() if device_.type == "cpu" else None,
              **{k: info[k] for k in ("rank_multiple", "plan_strategy") if k in info}}
    results = {}
    with PeakMemory(device_) as mem1:
        results["batch1"] = _median_speed(model, vocab, 1, 64, new_tokens, repeats)
    with PeakMemory(device_) as mem16:
        results["batch16"] = _median_speed(model, vocab, 16, 64, new_tokens, repeats)
    with PeakMemory(device_) as mem_prefill:
        results["prefill_tokens_per_s"] = _prefill(model, vocab, 4, 512, repeats)
    if graphs:
        decoder = GraphDecoder(model)
        for batch in (1, 16):
            with PeakMemory(device_) as memory:  # the warm-up included: on a GPU, the graphs' own memory pool
                results[f"graph_batch{batch}"] = _median_speed(model, vocab, batch, 64, new_tokens, repeats, decoder)
            record.update({f"graph_b{batch}_tokens_per_s": results[f"graph_batch{batch}"]["generate_tokens_per_s"],
                           **memory.as_dict(f"graph_b{batch}")})
        decoder.close()
    record.update(
        gen_b1_tokens_per_s=results["batch1"]["generate_tokens_per_s"],
        gen_b16_tokens_per_s=results["batch16"]["generate_tokens_per_s"],
        prefill_tokens_per_s=results["prefill_tokens_per_s"],
        prefill_shape=[4, 512],
        new_tokens=new_tokens, repeats=repeats, details=results,
        **mem1.as_dict("gen_b1"), **mem16.as_dict("gen_b16"), **mem_prefill.as_dict("prefill"),
        process_maxrss_bytes=maxrss_bytes() if device_.type == "cpu" else None,
    )
    return record


def run_speed(models: list[str], variants: list[tuple[str, float]], budget: Budget, device: str, dtype: str,
              new_tokens: int = 64, repeats: int = 3, tag: str | None = None, results_dir=None,
              graphs: bool = False, pack: bool = True) -> list[dict]:
    """Each (method, reduction) in its own process, so memory figures do not mix; students packed or not."""
    records = []
    for model in models:
        for method, reduction in variants:
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "speed.json"
                cmd = [sys.executable, "-m", "benchmarks.run", "_speed-worker", "--model", model, "--method", method,
                       "--reduction", str(reduction), "--device", device, "--dtype", dtype, "--tokens",
                       str(budget.tokens), "--new-tokens", str(new_tokens), "--repeats", str(repeats),
                       "--threads", str(torch.get_num_threads()), "--out", str(out), "--pack" if pack else "--no-pack"
                       ] + (["--graphs"] if graphs else [])
                log(f"speed: {model} {method} @ {reduction:.0%}{'' if pack else ', unpacked'}")
                proc = subprocess.run(cmd, cwd=ROOT, env=os.environ.copy())
                if proc.returncode != 0 or not out.exists():
                    log(f"  speed worker failed with code {proc.returncode}")
                    continue
                record = json.loads(out.read_text())
            if tag:
                record["tag"] = tag
            write_record("speed", record, results_dir)
            records.append(record)
            log(f"  b1 {record['gen_b1_tokens_per_s']:.1f} tok/s, b16 {record['gen_b16_tokens_per_s']:.1f} tok/s, "
                f"prefill {record['prefill_tokens_per_s']:.0f} tok/s, weights {record['weight_bytes'] / 2**20:.0f} MiB"
                + (f"; compiled static cache ({record['details']['graph_batch16']['compile_mode']}): "
                   f"b1 {record['graph_b1_tokens_per_s']:.1f} tok/s, b16 {record['graph_b16_tokens_per_s']:.1f} tok/s"
                   if "graph_b16_tokens_per_s" in record else ""))
    return records
