"""The settings dataclasses the panels hand to the controller: each gathers one handler's gradio inputs,
so the handler can be called (and tested) with plain values."""

from __future__ import annotations

from dataclasses import dataclass

from lillama_core.chat import SamplingConfig
from lillama_core.config import PlanConfig


@dataclass(frozen=True)
class ChatSettings:
    """How both models answer: the shared sampling settings, the browser session asking, so that
    Stop ends only that tab's answer, and whether both decode through a static cache with the decode step
    compiled (CUDA graphs on a GPU)."""

    sampling: SamplingConfig
    session: str = ""
    graphs: bool = False

    @classmethod
    def from_inputs(cls, max_new, temperature, top_p, top_k, penalty, seed, session: str = "",
                    graphs: bool = False) -> ChatSettings:
        """From the sampling sliders' values (gradio sends numbers as floats, an empty seed as None)."""
        return cls(SamplingConfig(int(max_new), float(temperature), float(top_p), int(top_k), float(penalty),
                                  int(seed or 0)), session, bool(graphs))


@dataclass(frozen=True)
class ChatFrame:
    """Both conversations as they stand, with each side's speed line; `done` on the last frame."""

    teacher: list[dict]
    student: list[dict]
    teacher_speed: str
    student_speed: str
    done: bool = False


@dataclass(frozen=True)
class EvalSettings:
    """What the Evaluate panel scores: held-out text (or speech clips), its size, which models."""

    text: str = "default"
    tokens: int = 8192
    seq_len: int = 256
    batch16: bool = False  # also time generation at batch 16
    quantized: bool = False  # add weight-only int8 and int4 copies of each model
    audio: str = "synthetic"


@dataclass(frozen=True)
class AccuracySettings:
    """What the Evaluate panel's zero-shot section scores."""

    tasks: tuple[str, ...] = ("arc_easy", "piqa")
    limit: int = 50  # documents per task; 0: whole splits
    prompts: int = 0  # generation quality: greedy answers to this many Alpaca seed instructions (0: skip)
    every_run: bool = False  # also score these tasks after every later distillation


@dataclass(frozen=True)
class PresetSettings:
    """The Ranks panel's preset inputs, in the panel's units (percent; fixed rank 0 = use the target)."""

    strategy: str
    reduction_percent: float
    layer_keep_percent: float
    fixed_rank: int | None = None
    groups: tuple[str, ...] = ()
    rank_multiple: int = PlanConfig.rank_multiple

    def plan_config(self) -> PlanConfig:
        """The PlanConfig these inputs ask for: a fixed rank replaces the target reduction."""
        rank = int(self.fixed_rank) if self.fixed_rank else None
        return PlanConfig(strategy=self.strategy, reduction=None if rank else self.reduction_percent / 100,
                          rank=rank, layer_keep=self.layer_keep_percent / 100, groups=list(self.groups),
                          rank_multiple=int(self.rank_multiple))
