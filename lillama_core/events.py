"""Typed progress events. The engine emits them; the CLI (tqdm), the job runner (events.jsonl) and
the app (live plots) consume them. Each event is a flat dataclass that round-trips through JSON; fields
are keyword-only so a new field never shifts the meaning of a positional argument."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum

from .runtime.finite import json_safe


class RunStatus(StrEnum):
    """How a compression run ended (RunFinished.status)."""

    COMPLETED = "completed"
    STOPPED = "stopped"


class StepStage(StrEnum):
    """What an optimiser step trains (Step.stage)."""

    DISTILL = "distill"  # one layer, against the teacher layer's outputs
    HEAL = "heal"  # every low-rank factor at once, against the teacher's logits


WHOLE_MODEL = -1  # Step.layer of steps that train no single layer (healing)


@dataclass(kw_only=True)
class Event:
    time: float = field(default_factory=time.time)

    @property
    def kind(self) -> str:
        return EVENT_KINDS_BY_CLASS[type(self)]

    def to_dict(self) -> dict:
        return {"kind": self.kind, **asdict(self)}

    def to_json(self) -> str:
        """One line of strict JSON: a NaN or infinite number (a diverged loss) is written as null, because
        `NaN` is not JSON and other readers of events.jsonl (jq, JavaScript) refuse the whole line."""
        return json.dumps(json_safe(self.to_dict()), allow_nan=False)


@dataclass(kw_only=True)
class RunStarted(Event):
    model: str
    device: str
    layers_total: int
    layers_to_compress: list[int]
    steps_total: int
    tokens: int
    params_before: int
    params_after: int


@dataclass(kw_only=True)
class Phase(Event):
    """A stage outside the layer loop (loading, tokenising, capturing inputs, planning)."""

    name: str
    detail: str = ""


@dataclass(kw_only=True)
class LayerStarted(Event):
    layer: int
    position: int  # 1-based index among the layers being compressed
    of: int
    modules: dict[str, int]  # local module name -> rank
    steps: int


@dataclass(kw_only=True)
class Step(Event):
    layer: int
    step: int  # 1-based within the layer
    steps: int
    global_step: int
    steps_total: int
    loss_teacher_input: float
    loss_student_input: float
    lr: float
    tokens_per_s: float
    elapsed_s: float
    eta_s: float
    vram_used_bytes: int | None = None
    vram_total_bytes: int | None = None
    torch_peak_allocated_bytes: int | None = None
    torch_peak_reserved_bytes: int | None = None
    skipped: bool = False  # the loss was not finite and the update was skipped
    rss_bytes: int | None = None  # CPU runs: resident memory now (peak: torch_peak_allocated_bytes); older logs lack it
    stage: StepStage = StepStage.DISTILL  # older logs lack it: their healing steps carry layer WHOLE_MODEL


@dataclass(kw_only=True)
class LayerFinished(Event):
    layer: int
    init_loss: float  # held-out loss right after factorisation
    best_loss: float  # held-out loss of the state kept
    final_loss_teacher_input: float
    final_loss_student_input: float
    best_step: int
    seconds: float  # the whole layer: teacher targets to advancing both paths (factorisation + training before)
    params_before: int
    params_after: int
    skipped_steps: int = 0
    unreached_experts: int = 0  # experts of this layer no calibration token was routed to (whitened init)
    # Wall-clock seconds per phase (compress/timing.py PHASES); empty in older logs and for restored layers.
    breakdown: dict[str, float] = field(default_factory=dict)


@dataclass(kw_only=True)
class RunFinished(Event):
    status: RunStatus
    layers_done: list[int]
    seconds: float
    tokens: int
    message: str = ""


@dataclass(kw_only=True)
class RunError(Event):
    message: str
    error_type: str


EVENT_CLASSES = {"run_started": RunStarted, "phase": Phase, "layer_started": LayerStarted, "step": Step,
                 "layer_finished": LayerFinished, "run_finished": RunFinished, "run_error": RunError}
EVENT_KINDS_BY_CLASS = {cls: kind for kind, cls in EVENT_CLASSES.items()}

EventSink = Callable[[Event], None]


def event_from_dict(data: dict) -> Event:
    """The event a `to_dict()` wrote, from this or an older version (unknown fields are dropped).

    Raises:
        KeyError: an unknown kind.
        TypeError: a required field is missing.
    """
    data = dict(data)
    cls = EVENT_CLASSES[data.pop("kind")]
    if cls is Step and "stage" not in data and data.get("layer") == WHOLE_MODEL:
        data["stage"] = StepStage.HEAL  # logs from before Step.stage marked healing by its layer alone
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


def read_events(path) -> list[Event]:
    """Events from a JSONL log; a torn last line (process killed mid-write) is ignored."""
    events = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                events.append(event_from_dict(json.loads(line)))
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return events
