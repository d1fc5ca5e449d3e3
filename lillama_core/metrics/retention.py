"""A student's zero-shot accuracy as a share of its teacher's: per task, and on the mean over the tasks where
the teacher is clearly above chance (near-chance tasks make raw retention look better than it is)."""

from __future__ import annotations

from ..errors import ConfigError
from .zeroshot import TaskScore

CLEAR_Z = 2.0  # "clearly above chance": the teacher's accuracy exceeds chance by this many standard errors


def clearly_above_chance(score: TaskScore) -> bool:
    return score.score - score.chance > CLEAR_Z * score.stderr


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator > 0 else None


def compare_task(teacher: TaskScore, student: TaskScore) -> dict:
    """One task's row: the headline metric (acc_norm where reported, else acc) of both models with standard
    errors, chance, retention (student / teacher), retention above chance ((student - chance) / (teacher -
    chance)), and the share of documents where the student picks the teacher's answer. ConfigError when the
    two were not scored on the same documents."""
    if teacher.task != student.task or teacher.docs != student.docs:
        raise ConfigError(f"teacher and student were scored on different documents ({teacher.task}: {teacher.docs}, "
                          f"{student.task}: {student.docs})")
    same = sum(a == b for a, b in zip(teacher.picks, student.picks, strict=True))
    return {"task": teacher.task, "metric": teacher.metric, "docs": teacher.docs, "chance": teacher.chance,
            "teacher": teacher.score, "teacher_stderr": teacher.stderr,
            "student": student.score, "student_stderr": student.stderr,
            "retention": _ratio(student.score, teacher.score),
            "retention_above_chance": _ratio(student.score - teacher.chance, teacher.score - teacher.chance),
            "same_answer": same / len(teacher.picks) if teacher.picks and student.picks else None,
            "teacher_clearly_above_chance": clearly_above_chance(teacher)}


def compare(teacher: list[TaskScore], student: list[TaskScore]) -> dict:
    """{"tasks": one row per task (see compare_task), "summary": means over the tasks where the teacher is
    clearly above chance}. The summary's `retention` is the student's mean over the teacher's mean on those
    tasks, `retention_above_chance` the same on the accuracies less chance."""
    by_task = {s.task: s for s in student}
    rows = [compare_task(t, by_task[t.task]) for t in teacher if t.task in by_task]
    clear = [r for r in rows if r["teacher_clearly_above_chance"]]
    summary = {"tasks": [r["task"] for r in clear], "teacher_mean": None, "student_mean": None,
               "retention": None, "retention_above_chance": None}
    if clear:
        mean = {k: sum(r[k] for r in clear) / len(clear) for k in ("teacher", "student", "chance")}
        summary.update(teacher_mean=mean["teacher"], student_mean=mean["student"],
                       retention=_ratio(mean["student"], mean["teacher"]),
                       retention_above_chance=_ratio(mean["student"] - mean["chance"],
                                                     mean["teacher"] - mean["chance"]))
    return {"tasks": rows, "summary": summary}


def percent(value: float | None, stderr: float | None = None) -> str:
    """A share as shown in accuracy tables (CLI and app): "47.5% ± 7.9%", or "–" when not measured."""
    if value is None:
        return "–"
    return f"{value:.1%}" + (f" ± {stderr:.1%}" if stderr is not None else "")
