"""What a modality supplies to the engine: how its models are built, calibrated, previewed and scored, and how
its activations are shaped. The engine asks `loaded.task`, never the model's kind; a new modality is one
subclass registered in `tasks/__init__.py`."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import nn

from ..config import CalibrationConfig, RunConfig
from ..data.calibration import CalibrationData
from ..metrics.record import EvalRecord


class Task(ABC):
    """A modality. Subclasses are stateless: everything they need comes with each call.

    Class attributes:
        name: short id ("causal-lm").
        description: what the model does, for model cards.
        auto_class: the transformers Auto class that builds (and reloads) such models.
        auto_mapping: the transformers config -> model class mapping behind that Auto class.
        speed_batches: batch sizes whose prefill and generation speed `evaluate` can measure; () for none.
        chats, transcribes: whether the model answers text prompts, whether it transcribes audio (`transcribe`).
        load_note: what to tell the user once such a model is loaded, or None.
        teacher_is_perplexity: whether a teacher's score is its perplexity alone, so a known one can be reused.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    auto_class: ClassVar[str]
    auto_mapping: ClassVar[str]
    speed_batches: ClassVar[tuple[int, ...]] = (1, 16)
    chats: ClassVar[bool] = True
    transcribes: ClassVar[bool] = False
    load_note: ClassVar[str | None] = None
    teacher_is_perplexity: ClassVar[bool] = False

    def model_mapping(self):
        """The transformers mapping config class -> model class of `auto_mapping`."""
        from transformers.models.auto import modeling_auto

        return getattr(modeling_auto, self.auto_mapping)

    def handles(self, model_config) -> bool:
        """Whether transformers builds this config with this task's Auto class. A subclass counts as its base
        (a reloaded compressed export's config is a Lillama subclass of the teacher's config class)."""
        mapping = self.model_mapping()
        return any(cls in mapping for cls in type(model_config).__mro__[:-1])

    def model_class(self):
        """The transformers Auto class, for `from_pretrained`."""
        import transformers

        return getattr(transformers, self.auto_class)

    def load_preprocessor(self, source: str, **kwargs) -> object | None:
        """The input preprocessor besides the tokenizer (e.g. an audio feature extractor); None if none."""
        return None

    def check(self, config: RunConfig, model: nn.Module) -> list[str]:
        """Notices about settings adjusted to fit the model, before calibration. Raises ConfigError for lengths
        the model cannot take."""
        return []

    def eval_notices(self, config: RunConfig, model: nn.Module) -> list[str]:
        """Notices about evaluation settings adjusted to fit the model."""
        return []

    def calibration_warnings(self, config: CalibrationConfig) -> list[str]:
        """What the user should know about the calibration source before it is read."""
        return []

    @abstractmethod
    def calibrate(self, loaded, config: CalibrationConfig) -> CalibrationData:
        """Calibration sequences for `loaded` (a LoadedModel). Raises CalibrationError."""

    @abstractmethod
    def preview(self, loaded, config: CalibrationConfig) -> str:
        """Markdown: how much calibration data the config gives, and its first samples."""

    @abstractmethod
    def held_out(self, loaded, config: RunConfig, standalone: bool = False) -> object:
        """The held-out data every model of one comparison is scored on, prepared once from the teacher
        `loaded` (a LoadedModel). `standalone`: the model is scored alone, with no teacher to compare with.
        Raises CalibrationError, or ConfigError where a standalone score needs data the config lacks."""

    @abstractmethod
    def score(self, model: nn.Module, tokenizer, held_out: object, batch_size: int) -> EvalRecord:
        """Quality fields of an EvalRecord for `model` on data from `held_out`."""

    def eval_window(self, config: RunConfig, model: nn.Module) -> int | None:
        """The held-out window length actually scored, where the task cuts text into windows; else None."""
        return None

    def eval_batch_size(self, config: RunConfig) -> int:
        """Sequences per forward when scoring held-out data."""
        return 4

    def transcribe(self, loaded, model: nn.Module, samples, rate: int, max_tokens: int = 128) -> dict:
        """A clip's transcript by `model` (only where `transcribes`): text, tokens, seconds, tokens_per_s."""
        raise NotImplementedError(f"{self.name} models do not transcribe audio")

    def activation_positions(self, calibration: CalibrationData) -> int:
        """The longest sequence of activations a block sees for these data (for memory estimates)."""
        return calibration.sequences.shape[1]

    def student_encoder_states(self, student: nn.Module, calibration: CalibrationData, batches: list[slice],
                               store, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
        """[n, positions, hidden] the student's encoder output for every calibration row, which the student
        path's cross-attention reads; None for models without an encoder."""
        return None
