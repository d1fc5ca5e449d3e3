"""Plotly figures and tables built from engine data: pure functions, no gradio, easy to test."""

from __future__ import annotations

import math

import pandas as pd

from lillama_core.events import Event, LayerFinished, LayerStarted, RunFinished, RunStarted, Step, StepStage

ACCENT = "#7c3aed"
ACCENT_2 = "#0ea5e9"
MUTED = "#94a3b8"  # the teacher's bars: a mid grey, visible on light and dark panels
NEUTRAL = "#64748b"  # reference lines (device total, teacher, healing)
DAMAGE = "#ef4444"  # measured or predicted damage (KL), on light and dark panels
# Charts sit on the theme's panel: transparent backgrounds, grid lines as translucent grey, and text coloured
# by the page (studio.css sets plotly's SVG text to the theme's text colour; FONT_COLOR is the fallback).
TRANSPARENT = "rgba(0,0,0,0)"
GRID = "rgba(128,128,128,0.2)"
ZERO_LINE = "rgba(128,128,128,0.4)"
FONT_COLOR = "#7c8594"
AXIS = {"gridcolor": GRID, "zerolinecolor": ZERO_LINE, "linecolor": ZERO_LINE}
PALETTE = ["#7c3aed", "#0ea5e9", "#f97316", "#10b981", "#ef4444", "#eab308", "#ec4899", "#14b8a6", "#6366f1",
           "#84cc16"]
MAX_POINTS_PER_SERIES = 600
MAX_POINTS_PER_CHART = 6000  # all layers together: keeps each refresh small for the browser


def figure(data: list[dict], title: str, height: int = 300, **layout) -> dict:
    """A plotly figure as a plain dict: building it costs microseconds, unlike validated go.Figure
    objects, which matters when the live panel redraws several times a second."""
    base = {"title": {"text": title, "x": 0.01, "font": {"size": 14}}, "height": height,
            "margin": {"l": 50, "r": 20, "t": 40, "b": 40}, "legend": {"orientation": "h", "y": -0.25},
            "paper_bgcolor": TRANSPARENT, "plot_bgcolor": TRANSPARENT,
            "font": {"family": "Inter, sans-serif", "size": 12, "color": FONT_COLOR},
            "xaxis": dict(AXIS), "yaxis": dict(AXIS)}
    for key, value in layout.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return {"data": data, "layout": base}


def line(x: list, y: list, name: str, color: str, **extra) -> dict:
    return {"type": "scatter", "mode": "lines", "x": x, "y": y, "name": name, "line": {"color": color}, **extra}


def _thin(xs: list, ys: list, limit: int = MAX_POINTS_PER_SERIES) -> tuple[list, list]:
    """Every k-th point so long runs stay cheap to draw; the last point is always kept."""
    if len(xs) <= limit:
        return xs, ys
    k = math.ceil(len(xs) / limit)
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


def plan_chart(layers: list[dict], budget_after: int | None = None, damage: dict[int, float] | None = None) -> dict:
    """Parameters per layer before and after the plan; the budget as a per-layer average line; with `damage`
    (layer -> predicted KL at the share the plan keeps), that damage on a second axis."""
    x = [row["layer"] for row in layers]
    data = [{"type": "bar", "x": x, "y": [r["params_before"] for r in layers], "name": "teacher",
             "marker": {"color": MUTED}},
            {"type": "bar", "x": x, "y": [r["params_after"] for r in layers], "name": "student (plan)",
             "marker": {"color": ACCENT}}]
    shapes = []
    if budget_after is not None and layers:
        level = budget_after / len(layers)
        shapes.append({"type": "line", "xref": "paper", "x0": 0, "x1": 1, "y0": level, "y1": level,
                       "line": {"dash": "dot", "color": "#f97316"}})
    layout = {}
    if damage:
        shown = [layer for layer in x if layer in damage]
        data.append({"type": "scatter", "mode": "lines+markers", "x": shown, "y": [damage[i] for i in shown],
                     "name": "predicted damage (KL, right)", "yaxis": "y2", "line": {"color": DAMAGE}})
        layout["yaxis2"] = {**AXIS, "overlaying": "y", "side": "right", "showgrid": False, "rangemode": "tozero",
                            "title": {"text": "KL at this keep (nats)"}}
        layout["margin"] = {"r": 60}
    return figure(data, "Parameters per layer (dotted: budget per layer)", barmode="overlay", shapes=shapes,
                  xaxis={"title": {"text": "layer"}}, yaxis={"title": {"text": "weights in linear modules"}}, **layout)


# ---- live distillation ----


def loss_chart(events: list[Event]) -> dict:
    """Loss per step for both paths and every layer, on a log scale."""
    series: dict[int | None, dict[str, list]] = {}  # layer -> points; None: healing, which trains every layer
    for e in events:
        if isinstance(e, Step):
            s = series.setdefault(None if e.stage == StepStage.HEAL else e.layer, {"x": [], "t": [], "s": []})
            s["x"].append(e.global_step)
            s["t"].append(e.loss_teacher_input)
            s["s"].append(e.loss_student_input)
    data = []
    limit = max(50, min(MAX_POINTS_PER_SERIES, MAX_POINTS_PER_CHART // max(2 * len(series), 1)))
    for i, (layer, s) in enumerate(sorted(series.items(), key=lambda item: -1 if item[0] is None else item[0])):
        color = PALETTE[i % len(PALETTE)]
        x, t = _thin(s["x"], s["t"], limit)
        _, st = _thin(s["x"], s["s"], limit)
        if layer is None:  # end-to-end healing: one KL curve
            data.append(line(x, t, "healing KL", NEUTRAL, legendgroup="heal"))
            continue
        data.append(line(x, t, f"L{layer} teacher-input", color, legendgroup=str(layer)))
        data.append({**line(x, st, f"L{layer} student-input", color, legendgroup=str(layer), showlegend=False),
                     "line": {"color": color, "dash": "dot"}})
    return figure(data, "Loss per step (solid: teacher input, dotted: student input)", height=340,
                  xaxis={"title": {"text": "step"}}, yaxis={"type": "log"}, showlegend=len(series) <= 12)


def throughput_chart(events: list[Event]) -> dict:
    steps = [e for e in events if isinstance(e, Step)]
    x, y = _thin([e.global_step for e in steps], [e.tokens_per_s for e in steps])
    return figure([line(x, y, "tokens/s", ACCENT_2, fill="tozeroy")], "Calibration tokens / s", height=200,
                  xaxis={"title": {"text": "step"}}, showlegend=False)


def memory_chart(events: list[Event]) -> dict:
    """Device memory used (NVML) and torch's peak allocation; on CPU, the process's resident memory at each
    step with the run's highest reading marked."""
    steps = [e for e in events if isinstance(e, Step)]
    x = [e.global_step for e in steps]
    gib = 2**30
    data, shapes = [], []
    if any(e.vram_used_bytes for e in steps):
        for name, values, color in (
            ("device used (NVML)", [e.vram_used_bytes for e in steps], ACCENT),
            ("torch peak allocated", [e.torch_peak_allocated_bytes for e in steps], "#f97316"),
        ):
            data.append(line(*_thin(x, [(v or 0) / gib for v in values]), name, color))
        total = next((e.vram_total_bytes for e in reversed(steps) if e.vram_total_bytes), None)
        if total:
            shapes.append({"type": "line", "xref": "paper", "x0": 0, "x1": 1, "y0": total / gib, "y1": total / gib,
                           "line": {"dash": "dot", "color": NEUTRAL}})
        title = "VRAM (GiB; dotted: device total)"
    elif any(e.rss_bytes is None and e.torch_peak_allocated_bytes for e in steps):
        # Logs written before resident memory was recorded hold only the process's lifetime peak.
        data.append(line(*_thin(x, [(e.torch_peak_allocated_bytes or 0) / gib for e in steps]),
                         "process peak resident", ACCENT))
        title = "Memory (GiB, CPU: process peak resident, an older log)"
    else:
        resident = [(e.rss_bytes or 0) / gib for e in steps]
        data.append(line(*_thin(x, resident), "resident memory", ACCENT))
        if steps:  # the peak gets its own point, so thinning the line cannot hide it
            top = max(range(len(steps)), key=resident.__getitem__)
            data.append({"type": "scatter", "mode": "markers+text", "x": [x[top]], "y": [resident[top]],
                         "name": "run peak", "text": [human_bytes(steps[top].rss_bytes)],
                         "textposition": "top center", "marker": {"color": "#f97316", "size": 9}})
        title = "Memory (GiB, CPU: resident; marked: the run's peak)"
    return figure(data, title, height=200, shapes=shapes, xaxis={"title": {"text": "step"}})


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
                "time": duration(e.seconds),
                "state": "done" + (f" ({e.skipped_steps} skipped)" if e.skipped_steps else ""),
            })
        elif isinstance(e, RunFinished):
            for row in rows.values():
                if row["state"] == "running":
                    row["state"] = "stopped (kept dense)"
    columns = ["layer", "modules", "rank", "params kept", "init loss", "best loss", "loss T-in", "loss S-in", "time",
               "state"]
    return pd.DataFrame([rows[k] for k in sorted(rows)], columns=columns)


# ---- evaluation and exploration ----


def comparison_chart(rows: list[dict]) -> dict:
    """Teacher vs student side by side, one small bar chart per metric."""
    metrics = [("perplexity", "perplexity ↓"), ("parameters", "parameters ↓"), ("weight_bytes", "weight memory ↓"),
               ("generate_tokens_per_s", "generation tokens/s ↑")]
    metrics = [(k, label) for k, label in metrics if all(k in r for r in rows)]
    width = 1 / max(len(metrics), 1)
    data, layout = [], {}
    for i, (key, label) in enumerate(metrics, 1):
        suffix = "" if i == 1 else str(i)
        data.append({"type": "bar", "x": [r["model"] for r in rows], "y": [r[key] for r in rows], "showlegend": False,
                     "xaxis": f"x{suffix}", "yaxis": f"y{suffix}",
                     "marker": {"color": [MUTED if r["model"] == "teacher" else ACCENT for r in rows]}})
        domain = [(i - 1) * width + 0.03, i * width - 0.03]
        layout[f"xaxis{suffix}"] = {**AXIS, "domain": domain, "anchor": f"y{suffix}", "title": {"text": label}}
        layout[f"yaxis{suffix}"] = {**AXIS, "anchor": f"x{suffix}"}
    return figure(data, "Teacher vs student", height=280, **layout)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points not beaten on both axes (lower x and lower y are better)."""
    front = []
    for i, (x, y) in enumerate(points):
        if not any((x2 <= x and y2 <= y) and (x2 < x or y2 < y) for j, (x2, y2) in enumerate(points) if j != i):
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def tradeoff_chart(records: list[dict], x_key: str = "params_after", x_title: str = "parameters") -> dict:
    """Quality against size for every finished run, with the Pareto front drawn through the best."""
    records = [r for r in records if r.get("student_ppl") and r.get(x_key)]
    data, shapes = [], []
    if records:
        points = [(r[x_key], r["student_ppl"]) for r in records]
        data.append({"type": "scatter", "mode": "markers", "x": [p[0] for p in points], "y": [p[1] for p in points],
                     "name": "runs", "text": [r.get("name", "") for r in records],
                     "marker": {"size": 9, "color": ACCENT_2}})
        front = pareto_front(points)
        data.append({**line([points[i][0] for i in front], [points[i][1] for i in front], "Pareto front", ACCENT),
                     "mode": "lines+markers"})
        teacher = next((r["teacher_ppl"] for r in records if r.get("teacher_ppl")), None)
        if teacher:
            shapes.append({"type": "line", "xref": "paper", "x0": 0, "x1": 1, "y0": teacher, "y1": teacher,
                           "line": {"dash": "dot", "color": NEUTRAL}})
    return figure(data, f"Perplexity vs {x_title} (dotted: teacher)", height=320, shapes=shapes,
                  xaxis={"title": {"text": x_title}}, yaxis={"type": "log", "title": {"text": "perplexity"}})


def accuracy_chart(zero_shot: dict) -> dict:
    """Grouped bars per task: the teacher's and (when scored) the student's headline accuracy in %, with
    standard-error whiskers and each task's chance level as a dash."""
    teacher = zero_shot["teacher"]
    tasks = [s["task"] for s in teacher]
    models = [("teacher", MUTED), ("student", ACCENT)] if "student" in zero_shot else [("teacher", MUTED)]
    data = []
    for name, color in models:
        scores = {s["task"]: s for s in zero_shot[name]}
        metric = [("acc" if scores[t]["acc_norm"] is None else "acc_norm") for t in tasks]
        pairs = list(zip(tasks, metric, strict=True))
        data.append({"type": "bar", "name": name, "x": tasks, "marker": {"color": color},
                     "y": [100 * scores[t][m] for t, m in pairs],
                     "error_y": {"type": "data", "color": "#64748b",
                                 "array": [100 * scores[t][f"{m}_stderr"] for t, m in pairs]}})
    data.append({"type": "scatter", "mode": "markers", "name": "chance", "x": tasks,
                 "y": [100 * s["chance"] for s in teacher],
                 "marker": {"symbol": "line-ew-open", "size": 28, "color": "#0f172a", "line": {"width": 2}}})
    return figure(data, "Zero-shot accuracy (acc_norm where reported, else acc)", height=320, barmode="group",
                  yaxis={"title": {"text": "accuracy %"}, "rangemode": "tozero"})


def accuracy_tradeoff_chart(records: list[dict], x_key: str = "params_after", x_title: str = "parameters") -> dict:
    """Zero-shot accuracy (mean over the tasks where the teacher is clearly above chance) against size for
    every run that scored it, with the Pareto front (smaller and more accurate) drawn through the best."""
    records = [r for r in records if r.get("student_accuracy") is not None and r.get(x_key)]
    data, shapes = [], []
    if records:
        points = [(r[x_key], r["student_accuracy"]) for r in records]
        data.append({"type": "scatter", "mode": "markers", "x": [p[0] for p in points],
                     "y": [100 * p[1] for p in points], "name": "runs", "text": [r.get("name", "") for r in records],
                     "marker": {"size": 9, "color": ACCENT_2}})
        front = pareto_front([(x, -y) for x, y in points])  # higher accuracy is better
        data.append({**line([points[i][0] for i in front], [100 * points[i][1] for i in front], "Pareto front",
                            ACCENT), "mode": "lines+markers"})
        teacher = next((r["teacher_accuracy"] for r in records if r.get("teacher_accuracy") is not None), None)
        if teacher is not None:
            shapes.append({"type": "line", "xref": "paper", "x0": 0, "x1": 1, "y0": 100 * teacher,
                           "y1": 100 * teacher, "line": {"dash": "dot", "color": "#64748b"}})
    return figure(data, f"Zero-shot accuracy vs {x_title} (dotted: teacher)", height=320, shapes=shapes,
                  xaxis={"title": {"text": x_title}}, yaxis={"title": {"text": "mean accuracy %"}})
