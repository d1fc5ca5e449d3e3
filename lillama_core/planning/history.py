"""Finished runs as calibration points for the quality prediction (predict.py): for each distilled run of a
model, the training-free damage its plan is predicted to do and the perplexity it reached."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..jobs import JobStatus, list_runs
from .predict import QualityFit, fit_quality, plan_damage
from .ranks import ModelShape


@dataclass(frozen=True)
class RunPoint:
    """One finished run, seen through this model's measurements."""

    run: str  # the run folder's name
    damage: float  # predicted training-free KL of its plan, nats per token
    log_ratio: float  # log(student / teacher perplexity), as measured
    teacher_ppl: float


def run_points(runs_root: Path, model_name: str, shape: ModelShape, ladder: dict[int, dict[float, float | None]],
               groups: Iterable[str]) -> list[RunPoint]:
    """Every completed, distilled run of `model_name` under `runs_root` with both perplexities and its plan,
    its plan scored on `ladder` (runs of other models or without a plan this model has are left out).

    Args:
        runs_root: the runs folder (each run: config.json, plan.json, metrics.json).
        model_name: the model's name as runs record it (ModelConfig.name).
        shape: the model.
        ladder: layer -> kept share -> KL, as measured for the Ranks step.
        groups: the module groups the ladder was measured on.
    """
    names = {m.name for m in shape.modules}
    points = []
    for record in list_runs(runs_root):
        config, metrics = record.config, record.metrics
        if (record.status != JobStatus.COMPLETED or config is None or config.model.name != model_name
                or not config.distill.train):
            continue
        student, teacher = metrics.get("student_ppl"), metrics.get("teacher_ppl")
        try:
            ranks = json.loads((record.path / "plan.json").read_text())["ranks"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if not (student and teacher and math.isfinite(student) and ranks and set(ranks) <= names):
            continue
        damage = plan_damage(shape, ranks, ladder, groups).total
        points.append(RunPoint(record.name, damage, math.log(student / teacher), teacher))
    return points


def fit_runs(points: list[RunPoint]) -> QualityFit | None:
    """The damage -> perplexity fit on the runs (predict.fit_quality)."""
    return fit_quality([(p.damage, p.log_ratio) for p in points])
