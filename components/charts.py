"""Plotly figures and tables built from engine data: pure functions, no gradio, easy to test."""

from __future__ import annotations

import math

import pandas as pd
import plotly.graph_objects as go

from lillama_core.events import Event, LayerFinished, LayerStarted, RunFinished, RunStarted, Step

ACCENT = "#7c3aed"
ACCENT_2 = "#0ea5e9"
MUTED = "#cbd5e1"
PALETTE = ["#7c3aed", "#0ea5e9", "#f97316", "#10b981", "#ef4444", "#eab308", "#ec4899", "#14b8a6", "#6366f1",
           "#84cc16"]
MAX_POINTS_PER_SERIES = 600


def _layout(fig: go.Figure, title: str, height: int = 300, **kw) -> go.Figure:
    fig.update_layout(title=dict(text=title, x=0.01, font=dict(size=14)), height=height, template="plotly_white",
                      margin=dict(l=50, r=20, t=40, b=40), legend=dict(orientation="h", y=-0.2), **kw)
    return fig


def _thin(xs: list, ys: list) -> tuple[list, list]:
    """Every k-th point so long runs stay cheap to draw; the last point is always kept."""
    if len(xs) <= MAX_POINTS_PER_SERIES:
        return xs, ys
    k = math.ceil(len(xs) / MAX_POINTS_PER_SERIES)
    return xs[::k] + xs[-1:], ys[::k] + ys[-1:]


def human(n: float | int | None, unit: str = "") -> str:
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "–"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.1f}{suffix}{unit}"
    return f"{n:.0f}{unit}" if isinstance(n, (int, float)) else str(n)


def human_bytes(n: int | None) -> str:
    if n is None:
        return "–"
    for div, suffix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= div:
            return f"{n / div:.1f} {suffix}"
    return f"{n} B"


def duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "–"
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


# ---- rank plan ----


def plan_chart(layers: list[dict], budget_after: int | None = None) -> go.Figure:
    """Parameters per layer before and after the plan; the budget as a per-layer average line."""
    x = [row["layer"] for row in layers]
    fig = go.Figure()
    fig.add_bar(x=x, y=[r["params_before"] for r in layers], name="teacher", marker_color=MUTED)
    fig.add_bar(x=x, y=[r["params_after"] for r in layers], name="student (plan)", marker_color=ACCENT)
    if budget_after is not None and layers:
        fig.add_hline(y=budget_after / len(layers), line_dash="dot", line_color="#f97316",
                      annotation_text="budget per layer", annotation_position="top left")
    return _layout(fig, "Parameters per layer", barmode="overlay", xaxis_title="layer",
                   yaxis_title="weights in linear modules")


# ---- live distillation ----


def loss_chart(events: list[Event]) -> go.Figure:
    """Loss per step for both paths and every layer, on a log scale."""
    series: dict[int, dict[str, list]] = {}
    for e in events:
        if isinstance(e, Step):
            s = series.setdefault(e.layer, {"x": [], "t": [], "s": []})
            s["x"].append(e.global_step)
            s["t"].append(e.loss_teacher_input)
            s["s"].append(e.loss_student_input)
    fig = go.Figure()
    for i, (layer, s) in enumerate(sorted(series.items())):
        color = PALETTE[i % len(PALETTE)]
        x, t = _thin(s["x"], s["t"])
        _, st = _thin(s["x"], s["s"])
        fig.add_scatter(x=x, y=t, mode="lines", name=f"L{layer} teacher-input", line=dict(color=color),
                        legendgroup=str(layer))
        fig.add_scatter(x=x, y=st, mode="lines", name=f"L{layer} student-input",
                        line=dict(color=color, dash="dot"), legendgroup=str(layer), showlegend=False)
    fig.update_yaxes(type="log")
    return _layout(fig, "Loss per step (solid: teacher input, dotted: student input)", height=340,
                   xaxis_title="step", showlegend=len(series) <= 12)


def throughput_chart(events: list[Event]) -> go.Figure:
    steps = [e for e in events if isinstance(e, Step)]
    x, y = _thin([e.global_step for e in steps], [e.tokens_per_s for e in steps])
    fig = go.Figure(go.Scatter(x=x, y=y, mode="lines", line=dict(color=ACCENT_2), fill="tozeroy"))
    return _layout(fig, "Calibration tokens / s", height=200, xaxis_title="step")


def memory_chart(events: list[Event]) -> go.Figure:
    """Device memory used (NVML) and torch's peak allocation; on CPU, the process's peak RSS."""
    steps = [e for e in events if isinstance(e, Step)]
    x = [e.global_step for e in steps]
    fig = go.Figure()
    gib = 2**30
    if any(e.vram_used_bytes for e in steps):
        for name, values, color in (
            ("device used (NVML)", [e.vram_used_bytes for e in steps], ACCENT),
            ("torch peak allocated", [e.torch_peak_allocated_bytes for e in steps], "#f97316"),
        ):
            xs, ys = _thin(x, [(v or 0) / gib for v in values])
            fig.add_scatter(x=xs, y=ys, mode="lines", name=name, line=dict(color=color))
        total = next((e.vram_total_bytes for e in reversed(steps) if e.vram_total_bytes), None)
        if total:
            fig.add_hline(y=total / gib, line_dash="dot", annotation_text="device total")
        title = "VRAM (GiB)"
    else:
        xs, ys = _thin(x, [(e.torch_peak_allocated_bytes or 0) / gib for e in steps])
        fig.add_scatter(x=xs, y=ys, mode="lines", name="process peak RSS", line=dict(color=ACCENT))
        title = "Memory (GiB, CPU: process peak resident)"
    return _layout(fig, title, height=200, xaxis_title="step")


def run_progress(events: list[Event]) -> dict:
    """Where a run stands: fraction done, ETA, current layer, last rates."""
    started = next((e for e in events if isinstance(e, RunStarted)), None)
    last_step = next((e for e in reversed(events) if isinstance(e, Step)), None)
    finished = next((e for e in reversed(events) if isinstance(e, RunFinished)), None)
    layer = next((e for e in reversed(events) if isinstance(e, LayerStarted)), None)
    done = last_step.global_step if last_step else 0
    total = started.steps_total if started else 0
    return {
        "fraction": 1.0 if finished and finished.status == "completed" else (done / total if total else 0.0),
        "eta_s": 0.0 if finished else (last_step.eta_s if last_step else None),
        "layer": layer.layer if layer else None,
        "position": f"{layer.position}/{layer.of}" if layer else "–",
        "tokens_per_s": last_step.tokens_per_s if last_step else None,
        "vram_used": last_step.vram_used_bytes if last_step else None,
        "vram_total": last_step.vram_total_bytes if last_step else None,
        "peak": last_step.torch_peak_allocated_bytes if last_step else None,
        "elapsed_s": last_step.elapsed_s if last_step else None,
        "status": finished.status if finished else ("running" if started else "starting"),
    }


def layer_table(events: list[Event]) -> pd.DataFrame:
    rows: dict[int, dict] = {}
    for e in events:
        if isinstance(e, LayerStarted):
            ranks = sorted(set(e.modules.values()))
            rows[e.layer] = {"layer": e.layer, "modules": len(e.modules),
                             "rank": f"{ranks[0]}–{ranks[-1]}" if len(ranks) > 1 else str(ranks[0]),
                             "params kept": "", "init loss": "", "best loss": "", "loss T-in": "",
                             "loss S-in": "", "time": "", "state": "running"}
        elif isinstance(e, LayerFinished) and e.layer in rows:
            rows[e.layer].update({
                "params kept": f"{e.params_after / e.params_before:.0%}",
                "init loss": f"{e.init_loss:.4f}", "best loss": f"{e.best_loss:.4f}",
                "loss T-in": f"{e.final_loss_teacher_input:.4f}", "loss S-in": f"{e.final_loss_student_input:.4f}",
                "time": duration(e.seconds), "state": "done" + (f" ({e.skipped_steps} skipped)" if e.skipped_steps else ""),
            })
        elif isinstance(e, RunFinished):
            for row in rows.values():
                if row["state"] == "running":
                    row["state"] = "stopped (kept dense)"
    columns = ["layer", "modules", "rank", "params kept", "init loss", "best loss", "loss T-in", "loss S-in", "time",
               "state"]
    return pd.DataFrame([rows[k] for k in sorted(rows)], columns=columns)


# ---- evaluation and exploration ----


def comparison_chart(rows: list[dict]) -> go.Figure:
    """Teacher vs student side by side, each metric relative to the teacher."""
    from plotly.subplots import make_subplots

    metrics = [("perplexity", "perplexity ↓"), ("parameters", "parameters ↓"), ("weight_bytes", "weight memory ↓"),
               ("generate_tokens_per_s", "generation tokens/s ↑")]
    metrics = [(k, label) for k, label in metrics if all(k in r for r in rows)]
    fig = make_subplots(rows=1, cols=max(len(metrics), 1), subplot_titles=[label for _, label in metrics])
    for col, (key, _) in enumerate(metrics, 1):
        fig.add_bar(x=[r["model"] for r in rows], y=[r[key] for r in rows], showlegend=False,
                    marker_color=[MUTED if r["model"] == "teacher" else ACCENT for r in rows], row=1, col=col)
    return _layout(fig, "Teacher vs student", height=280)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points not beaten on both axes (lower x and lower y are better)."""
    front = []
    for i, (x, y) in enumerate(points):
        if not any((x2 <= x and y2 <= y) and (x2 < x or y2 < y) for j, (x2, y2) in enumerate(points) if j != i):
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def tradeoff_chart(records: list[dict], x_key: str = "params_after", x_title: str = "parameters") -> go.Figure:
    """Quality against size for every finished run, with the Pareto front drawn through the best."""
    records = [r for r in records if r.get("student_ppl") and r.get(x_key)]
    fig = go.Figure()
    if records:
        points = [(r[x_key], r["student_ppl"]) for r in records]
        fig.add_scatter(x=[p[0] for p in points], y=[p[1] for p in points], mode="markers", name="runs",
                        text=[r.get("name", "") for r in records], marker=dict(size=9, color=ACCENT_2))
        front = pareto_front(points)
        fig.add_scatter(x=[points[i][0] for i in front], y=[points[i][1] for i in front], mode="lines+markers",
                        name="Pareto front", line=dict(color=ACCENT, width=2))
        teacher = [r for r in records if r.get("teacher_ppl")]
        if teacher:
            fig.add_hline(y=teacher[0]["teacher_ppl"], line_dash="dot", annotation_text="teacher")
    fig.update_yaxes(type="log")
    return _layout(fig, f"Perplexity vs {x_title}", height=320, xaxis_title=x_title, yaxis_title="perplexity")
