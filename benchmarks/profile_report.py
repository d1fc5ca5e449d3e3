"""The profile suite's section of docs/benchmarks.md: each layer's time by phase, before and after a change.

Records are grouped by tag (e.g. `before`, `after`); every number is the median over the group's runs of the
run's mean per profiled layer, so interleaved runs on a noisy machine are compared like for like."""

from __future__ import annotations

import statistics

PHASE_LABELS = {"teacher_targets": "teacher targets", "covariance": "covariance", "factorisation": "factorisation",
                "train_steps": "**optimiser steps**", "step_events": "step events", "held_out": "held-out checks",
                "checkpoint": "checkpoint", "advance": "advance activations"}


def _per_layer(record: dict, phase: str) -> float:
    return record["phase_seconds"].get(phase, 0.0) / max(record["layers_profiled"], 1)


def _median(runs: list[dict], value) -> float:
    return statistics.median(value(r) for r in runs)


def profile_section(records: list[dict]) -> list[str]:
    """The section's markdown lines (none without profile records): phases, shares, rates, MFU, projections."""
    runs = [r for r in records if r.get("suite") == "profile"]
    if not runs:
        return []
    groups: dict[str, list[dict]] = {}
    for r in runs:
        groups.setdefault(r.get("tag") or "untagged", []).append(r)
    tags = list(groups)
    first = runs[0]
    lines = ["### Where a layer's time goes (profile)", "",
             "`python -m benchmarks.run profile`: the engine's own per-layer breakdown (LayerFinished.breakdown). "
             "*Optimiser steps* are the training; everything else is overhead around it.", "",
             f"{_title(first)}; medians over runs (runs: "
             + ", ".join(f"{t} {len(groups[t])}" for t in tags) + ").", "",
             "| seconds per layer | " + " | ".join(tags) + " |", "|---|" + "---:|" * len(tags)]
    for phase, label in PHASE_LABELS.items():
        lines.append(f"| {label} | " + " | ".join(f"{_median(groups[t], lambda r, p=phase: _per_layer(r, p)):.2f}"
                                                    for t in tags) + " |")
    rows = [
        ("**layer total**", lambda r: r["layer_seconds"] / r["layers_profiled"], "{:.1f}"),
        ("share outside optimiser steps", lambda r: r["outside_training_share"], "{:.1%}"),
        ("distillation tokens/s in optimiser steps", lambda r: r["step_tokens_per_s_median"], "{:,.0f}"),
        ("distillation tokens/s per layer (whole layer)", lambda r: r["layer_tokens_per_s_median"], "{:,.0f}"),
        ("MFU, whole layer", lambda r: r["mfu_median"], "{:.1%}"),
        ("MFU, optimiser steps only", lambda r: r["step_mfu_median"], "{:.1%}"),
        ("fp32 matmul peak measured (GFLOP/s)", lambda r: r["peak_fp32_flops"] / 1e9, "{:.0f}"),
        ("projected distillation, 1M tokens (h)", lambda r: r["projected_distill_seconds"]["1000000"] / 3600,
         "{:.1f}"),
        ("projected distillation, 13M tokens (h)", lambda r: r["projected_distill_seconds"]["13000000"] / 3600,
         "{:.0f}"),
    ]
    for label, value, spec in rows:
        lines.append(f"| {label} | " + " | ".join(spec.format(_median(groups[t], value)) for t in tags) + " |")
    return lines + ["", f"FLOPs per training token per layer: {first['flops_formula']}; MFU against the measured "
                        f"peak ({first['peak_method']}). Projections scale the measured phases to the token budget "
                        f"for all {first['plan_layers']} layers of the plan: they are projections, not runs. "
                        "Each row is its own median, so the phase rows need not add up to the total.", ""]


def _title(r: dict) -> str:
    return (f"**{r['model']}** at {r['target_reduction']:.0%} ({r['method']} plan, default distillation), "
            f"{r['device']} {r['dtype']}, {r['env'].get('torch_threads')} threads, {r['tokens']:,} calibration "
            f"tokens, first {r['layers_profiled']} of {r['plan_layers']} layers")
