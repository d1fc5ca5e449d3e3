"""The prediction check's section of docs/benchmarks.md: for each group of comparable runs, every plan's
perplexity predicted from the others (leave one out, the fit the app makes on its history), against the measured
one: Spearman rank correlation and relative error."""

from __future__ import annotations

import math
import statistics

from scipy.stats import spearmanr

from lillama_core.planning.predict import fit_quality

TARGET_SPEARMAN = 0.9


def leave_one_out(runs: list[dict]) -> list[float | None]:
    """Each run's perplexity predicted from the damage -> perplexity fit on the other runs (None: no fit)."""
    points = [(r["predicted_damage"], math.log(r["ppl"] / r["teacher_ppl"])) for r in runs]
    out = []
    for i, run in enumerate(runs):
        fit = fit_quality(points[:i] + points[i + 1:])
        out.append(fit.perplexity(run["predicted_damage"], run["teacher_ppl"]) if fit else None)
    return out


def check(runs: list[dict]) -> dict:
    """Spearman of predicted vs measured perplexity (and of the damage alone), and the relative errors."""
    predicted = leave_one_out(runs)
    pairs = [(p, r["ppl"]) for p, r in zip(predicted, runs, strict=True) if p is not None]
    errors = [abs(p / m - 1) for p, m in pairs]
    damages, measured = [r["predicted_damage"] for r in runs], [r["ppl"] for r in runs]
    return {"predicted": predicted, "runs": len(pairs),
            "spearman": float(spearmanr([p for p, _ in pairs], [m for _, m in pairs]).statistic),
            "damage_spearman": float(spearmanr(damages, measured).statistic),
            "mean_error": statistics.mean(errors), "median_error": statistics.median(errors), "max_error": max(errors)}


def _latest_run(records: list[dict]) -> list[dict]:
    """The records of the newest predict run (one ladder), in the order it wrote them."""
    runs = [r for r in records if r.get("suite") == "predict"]
    if not runs:
        return []
    newest = max(runs, key=lambda r: r["timestamp"])["sweep"]
    return [r for r in runs if r["sweep"] == newest]


def _cached(run: dict) -> str:
    return "; this run read it from the planning cache" if run.get("ladder_cached") else ""


def _label(run: dict) -> str:
    overrides = ", ".join(f"{k.split('.')[2]} dense" for k in (run.get("overrides") or {}))
    return f"{run['strategy']} {100 * run['target_reduction']:.0f}%" + (f" (layers {overrides})" if overrides else "")


def predict_section(records: list[dict]) -> list[str]:
    """The section's markdown lines (none without predict records)."""
    runs = _latest_run(records)
    if not runs:
        return []
    first = runs[0]
    lines = ["### Predicted vs measured perplexity (the Ranks step's prediction)", "",
             f"{first['model']} on {first['env'].get('cpu', first['device'])} ({first['device']}). Every plan the "
             "quality and ablation suites ran on this device with "
             f"{first['ladder_calibration']['tokens']:,} calibration and {first['eval']['tokens']:,} evaluation "
             "tokens is scored with the training-free damage the Ranks step predicts: the per-layer KL ladder "
             f"measured once (sensitivity probes on {first['ladder_calibration']['measured_tokens']:,} tokens; "
             f"{first['ladder_seconds']:.0f} s{_cached(first)}), interpolated at each layer's kept share and added "
             "over layers. "
             "Each plan's perplexity is then predicted from the others' (leave one out: log(ppl / teacher) = "
             "a · damage^b fitted on the rest), as the app calibrates on the runs in its history. Target: Spearman "
             f"≥ {TARGET_SPEARMAN} between predicted and measured perplexity. Teacher: {first['teacher_ppl']:.1f}.",
             ""]
    for group in ("distilled", "training-free"):
        members = [r for r in runs if r["group"] == group]
        if len(members) < 3:
            continue
        result = check(members)
        verdict = "met" if result["spearman"] >= TARGET_SPEARMAN else "**not met**"
        in_app = "met" if result["damage_spearman"] >= TARGET_SPEARMAN else "**not met**"
        lines += [f"**{group}** ({result['runs']} plans): leave-one-out predictions, Spearman "
                  f"{result['spearman']:.3f} (target {verdict}); one fit on all runs, as the app ranks plans (the fit "
                  f"is monotone in damage, so this is the damage's own ranking), Spearman "
                  f"{result['damage_spearman']:.3f} (target {in_app}). Leave-one-out relative error: mean "
                  f"{result['mean_error']:.0%}, median {result['median_error']:.0%}, max {result['max_error']:.0%}.",
                  "",
                  "| plan | reduction | damage (nats) | predicted ppl | measured ppl | error |",
                  "|---|---:|---:|---:|---:|---:|"]
        for run, predicted in sorted(zip(members, result["predicted"], strict=True),
                                     key=lambda item: item[0]["predicted_damage"]):
            shown = f"{predicted:.1f}" if predicted else "–"
            error = f"{predicted / run['ppl'] - 1:+.0%}" if predicted else "–"
            lines.append(f"| {_label(run)} | {run['reduction']:.1%} | {run['predicted_damage']:.3f} | {shown} | "
                         f"{run['ppl']:.1f} | {error} |")
        lines.append("")
    return lines
