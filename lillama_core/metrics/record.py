"""Typed measurements: one model's `EvalRecord`, and the `RunMetrics` a compression run writes to metrics.json.

Both write flat dictionaries with the keys run folders, the app's tables and `--json` output have always used,
and read them back, old folders included: a field not measured is None and left out of the dictionary."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


def _measured(record) -> dict:
    return {f.name: getattr(record, f.name) for f in dataclasses.fields(record)
            if getattr(record, f.name) is not None and f.name != "extra"}


def _known(cls, data: dict) -> tuple[dict, dict]:
    """(the keys that are fields of cls, the rest)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return ({k: v for k, v in data.items() if k in names}, {k: v for k, v in data.items() if k not in names})


@dataclass
class EvalRecord:
    """One model on held-out data. Text models: perplexity of held-out text; speech models: perplexity of the
    teacher's transcripts and word error rate of the model's own ones. Speeds in tokens per second."""

    perplexity: float | None = None
    nll: float | None = None  # mean next-token negative log-likelihood, nats
    tokens_scored: int | None = None
    eval_seconds: float | None = None
    wer: float | None = None  # word error rate, 0..1 (can pass 1)
    wer_reference: str | None = None  # "true transcripts" or "teacher transcripts"
    wer_scorer: str | None = None  # how the texts were compared, e.g. "jiwer corpus WER, whisper english normaliser"
    clips: int | None = None  # held-out audio clips scored
    transcribe_tokens_per_s: float | None = None
    prefill_tokens_per_s: float | None = None  # batch 1
    generate_tokens_per_s: float | None = None  # batch 1
    prefill_tokens_per_s_b16: float | None = None
    generate_tokens_per_s_b16: float | None = None
    parameters: int | None = None
    weight_bytes: int | None = None  # as serialised (integer weights count their packed size)
    peak_memory_bytes: int | None = None  # CUDA peak while measured; None on CPU
    accuracy: dict[str, float] | None = None  # zero-shot accuracy per task, where measured (lm-eval)

    def to_dict(self) -> dict[str, Any]:
        """The measured fields (None ones left out)."""
        return _measured(self)

    @classmethod
    def from_dict(cls, data: dict) -> EvalRecord:
        """A record from `to_dict` output; keys it does not know are ignored."""
        return cls(**_known(cls, data)[0])


@dataclass
class RunMetrics:
    """What a compression run measured, as written to a run folder's metrics.json."""

    model: str | None = None
    status: str | None = None  # "completed" or "stopped"
    device: str | None = None
    params_before: int | None = None
    params_after: int | None = None
    reduction: float | None = None  # share of all parameters removed, embeddings included
    weight_bytes_before: int | None = None
    weight_bytes_after: int | None = None
    planned_reduction: float | None = None
    tokens: int | None = None  # calibration tokens
    compress_seconds: float | None = None
    layers_done: int | None = None
    unreached_experts: int | None = None
    seconds: float | None = None  # the whole run, evaluation included once measured
    teacher_ppl: float | None = None
    student_ppl: float | None = None
    eval_seq_len: int | None = None
    teacher_wer: float | None = None
    student_wer: float | None = None
    wer_reference: str | None = None
    wer_scorer: str | None = None
    eval_clips: int | None = None
    zero_shot: dict | None = None  # lm-eval accuracy of teacher and student per task, with retention (zeroshot.py)
    extra: dict[str, Any] = field(default_factory=dict)  # healing's numbers, and keys of newer or older writers

    def to_dict(self) -> dict[str, Any]:
        """The flat metrics.json dictionary: measured fields, then `extra`."""
        return {**_measured(self), **self.extra}

    @classmethod
    def from_dict(cls, data: dict) -> RunMetrics:
        """Metrics of any run folder, old ones included; keys that are not fields are kept in `extra`."""
        known, rest = _known(cls, data)
        known.pop("extra", None)
        return cls(**known, extra=rest)

    def add_evaluation(self, teacher: EvalRecord, student: EvalRecord) -> None:
        """Fill the teacher/student quality fields from two records of the same held-out data."""
        self.teacher_ppl, self.student_ppl = teacher.perplexity, student.perplexity
        self.teacher_wer, self.student_wer = teacher.wer, student.wer
        self.wer_reference, self.wer_scorer, self.eval_clips = student.wer_reference, student.wer_scorer, student.clips
