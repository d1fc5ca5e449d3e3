"""Command-line flags generated from the config dataclasses, as LLaMA-Factory's HfArgumentParser does.

Every leaf field of RunConfig gets `--section.field-name` (`--distill.weight-decay`; a top-level field
`--field-name`), typed from its annotation and explained by its help metadata, and also `--field-name` where
only one field has that name and nothing else claims it. The flags the CLI had before they were generated stay
as aliases (ALIASES). Bools take `--x` / `--no-x`, lists a comma list, dicts JSON, enums one of their values and
Optional fields `none`. Generated flags default to argparse.SUPPRESS, so a parsed namespace holds exactly the
flags given: those override a recipe file even where they repeat a default.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass

from .config import RunConfig
from .errors import ConfigError

# A flag of the hand-written CLI -> the fields it sets. The first names the parsed attribute; the others follow
# it unless given themselves. A bool alias has its --no- form too (--no-distill). A renamed field: one line here.
ALIASES: dict[str, tuple[str, ...]] = {
    "--model": ("model.name",), "--device": ("model.device",), "--dtype": ("model.dtype",),
    "--trust-remote-code": ("model.trust_remote_code",), "--offload": ("model.offload",),
    "--calibration": ("calibration.source",), "--text-field": ("calibration.text_field",),
    "--dataset-config": ("calibration.dataset_config",), "--split": ("calibration.split",),
    "--tokens": ("calibration.tokens",), "--seq-len": ("calibration.seq_len",),
    "--batch-size": ("calibration.batch_size",),
    "--reduction": ("plan.reduction",), "--rank": ("plan.rank",), "--strategy": ("plan.strategy",),
    "--layer-keep": ("plan.layer_keep",), "--rank-multiple": ("plan.rank_multiple",), "--groups": ("plan.groups",),
    "--init": ("distill.init",), "--lr": ("distill.lr",), "--epochs": ("distill.epochs",),
    "--loss": ("distill.loss",), "--distill": ("distill.train",), "--activations": ("distill.activations",),
    "--heal-tokens": ("heal.tokens",), "--heal-lr": ("heal.lr",),
    "--eval-text": ("eval.text",), "--eval-tokens": ("eval.tokens",), "--eval-seq-len": ("eval.seq_len",),
    "--eval-audio": ("eval.audio",),
    "--seed": ("seed", "calibration.seed"),
}

TRUE_WORDS = ("true", "yes", "on", "1")
FALSE_WORDS = ("false", "no", "off", "0")
NONE_WORDS = ("none", "null")


@dataclass(frozen=True)
class ConfigField:
    """One leaf setting of RunConfig: where it lives, its type, its default and its help."""

    path: str  # "distill.lr"; a top-level field is its bare name ("seed")
    hint: object  # the resolved annotation, e.g. float | None
    default: object
    help: str

    @property
    def name(self) -> str:
        return self.path.rpartition(".")[2]

    @property
    def section(self) -> str:
        return self.path.rpartition(".")[0] or "run"

    @property
    def flag(self) -> str:
        return "--" + self.path.replace("_", "-")

    def parse(self, text: str) -> object:
        """Read a command-line value of this field.

        Args:
            text: the value as typed: `3e-4`, `true`, `none`, `attention,mlp`, `{"*.layers.0.*": null}`.
        Returns:
            The value as the config holds it (an enum as its plain value).
        Raises:
            ConfigError: the text is not a value of the field's type.
        """
        try:
            return _parse(self.hint, text.strip())
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{self.path}: {exc}") from None


def _optional(hint) -> tuple[bool, object]:
    """(whether None is allowed, the type the command line gives): `Strategy | str` reads as the enum."""
    if typing.get_origin(hint) not in (typing.Union, types.UnionType):
        return False, hint
    rest = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    return len(rest) < len(typing.get_args(hint)), next((arg for arg in rest if _choices(arg)), rest[0])


def _choices(hint) -> list | None:
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return [member.value for member in hint]
    if typing.get_origin(hint) is typing.Literal:
        return list(typing.get_args(hint))
    return None


def _parse(hint, text: str) -> object:
    optional, hint = _optional(hint)
    if optional and text.lower() in NONE_WORDS:
        return None
    choices = _choices(hint)
    if choices is not None:
        if text not in [str(choice) for choice in choices]:
            raise ValueError(f"{text!r} is not one of {', '.join(map(str, choices))}")
        return next(choice for choice in choices if str(choice) == text)
    if hint is bool:
        if text.lower() not in TRUE_WORDS + FALSE_WORDS:
            raise ValueError(f"{text!r} is not true or false")
        return text.lower() in TRUE_WORDS
    origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        return [_parse(item, part.strip()) for part in text.split(",") if part.strip()]
    if origin is dict:
        value = json.loads(text)
        if not isinstance(value, dict):
            raise ValueError(f"{text!r} is not a JSON object")
        return value
    if hint in (int, float, str):
        return hint(text)
    raise TypeError(f"no command-line form for a {hint} setting")


def config_fields(cls: type = RunConfig, prefix: str = "") -> list[ConfigField]:
    """Every leaf setting of a config dataclass, nested sections first, in declaration order.

    Args:
        cls: the dataclass; RunConfig by default.
        prefix: the dotted path of `cls` inside RunConfig, with its trailing dot.
    Returns:
        One ConfigField per leaf.
    """
    hints = typing.get_type_hints(cls)
    fields = []
    for spec in dataclasses.fields(cls):
        hint = hints[spec.name]
        if dataclasses.is_dataclass(hint):
            fields += config_fields(hint, f"{prefix}{spec.name}.")
        else:
            default = spec.default if spec.default is not dataclasses.MISSING else spec.default_factory()
            fields.append(ConfigField(prefix + spec.name, hint, default, spec.metadata.get("help", "")))
    return fields


def config_field(path: str) -> ConfigField:
    """The field at a dotted path.

    Args:
        path: e.g. "distill.lr" or "seed".
    Returns:
        Its ConfigField.
    Raises:
        ConfigError: RunConfig has no such field.
    """
    for field in config_fields():
        if field.path == path:
            return field
    raise ConfigError(f"unknown setting {path!r}; settings are section.name, e.g. distill.lr or plan.strategy")


def parse_assignment(text: str) -> tuple[str, object]:
    """Read `section.name=value`, as benchmark `--set` options give it.

    Args:
        text: e.g. `distill.lr=1e-3` or `plan.overrides={"*.layers.0.*": null}`.
    Returns:
        (path, value), the value typed as the field is.
    Raises:
        ConfigError: no `=`, an unknown setting, or a value of the wrong type.
    """
    path, equals, value = text.partition("=")
    if not equals:
        raise ConfigError(f"expected section.name=value, not {text!r}")
    return path.strip(), config_field(path.strip()).parse(value)


class _Switch(argparse.Action):
    """A bool flag: its positive option strings set True, its negative ones (--no-x) False."""

    def __init__(self, option_strings, dest, negatives=(), **kwargs):
        super().__init__(option_strings, dest, nargs=0, **kwargs)
        self.negatives = frozenset(negatives)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, option_string not in self.negatives)


def _negative(option: str) -> str:
    """--offload -> --no-offload; --model.offload -> --model.no-offload."""
    section, dot, name = option[2:].rpartition(".")
    return f"--{section}{dot}no-{name}"


def _shown(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, list):
        return ",".join(map(str, value))
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value.value if isinstance(value, enum.Enum) else value)


def _escape(text: str) -> str:
    """argparse %-formats help strings: a literal % is doubled."""
    return text.replace("%", "%%")


def _value_type(field: ConfigField):
    def convert(text: str):
        try:
            return field.parse(text)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = field.name  # argparse names the type in its errors
    return convert


def _metavar(field: ConfigField) -> str:
    optional, hint = _optional(field.hint)
    choices = _choices(hint)
    if choices is not None:
        return "{" + ",".join([*map(str, choices), *(["none"] if optional else [])]) + "}"
    if typing.get_origin(hint) is dict:
        return "JSON"
    if typing.get_origin(hint) is list:
        return f"{field.name.upper()}[,...]"
    return field.name.upper()


def add_field_flag(parser, field: ConfigField | str, *flags: str, **settings) -> argparse.Action:
    """Add one flag for a config field, typed, checked and explained as the field is.

    Args:
        parser: an ArgumentParser or argument group.
        field: the field, or its path ("model.device").
        flags: option strings; the field's own (`--model.device`) when none are given.
        settings: argparse settings that differ from the field's, e.g. default= or help=.
    Returns:
        The argparse action.
    Raises:
        ConfigError: an unknown path.
    """
    field = field if isinstance(field, ConfigField) else config_field(field)
    flags = flags or (field.flag,)
    default = settings.pop("default", field.default)
    shown = field.default if default is argparse.SUPPRESS else default
    help_text = f"{_escape(settings.pop('help', field.help))} (default: {_escape(_shown(shown))})"
    if _optional(field.hint)[1] is bool:
        negatives = [_negative(flag) for flag in flags]
        return parser.add_argument(*flags, *negatives, action=_Switch, negatives=negatives, default=default,
                                   help=help_text, **settings)
    choices = _choices(_optional(field.hint)[1])
    if choices is not None and _optional(field.hint)[0]:
        choices = [*choices, None]
    return parser.add_argument(*flags, type=_value_type(field), choices=choices, metavar=_metavar(field),
                               default=default, help=help_text, **settings)


def _flags_of(field: ConfigField, fields: list[ConfigField], reserved: Iterable[str]) -> list[str]:
    """A field's option strings: its aliases, then its short form where unambiguous, then its own flag."""
    aliases = [flag for flag, paths in ALIASES.items() if paths[0] == field.path]
    short = "--" + field.name.replace("_", "-")
    unique = sum(other.name == field.name for other in fields) == 1
    taken = {*ALIASES, *reserved, *(other.flag for other in fields)}
    flags = aliases + ([short] if unique and not aliases and short not in taken else [])
    return flags + ([field.flag] if field.flag not in ALIASES else [])


def _value_at(config: RunConfig, path: str):
    for part in path.split("."):
        config = getattr(config, part)
    return config


def _selected(path: str, selection: Iterable[str] | None) -> bool:
    return selection is None or any(path == part or path.startswith(part + ".") for part in selection)


class ConfigArgs:
    """The generated flags for some config fields on one parser, and the RunConfig a parse of them describes."""

    def __init__(self, selection: Iterable[str] | None = None, reserved: Iterable[str] = ()):
        """Choose the fields and name their flags.

        Args:
            selection: sections ("model"), field paths ("calibration.source"), or None for every field.
            reserved: option strings no short form may take (a hand-written flag meaning something else).
        Raises:
            ConfigError: an alias names a field RunConfig does not have.
        """
        every = config_fields()
        paths = {field.path for field in every}
        stale = [flag for flag, targets in ALIASES.items() if not paths.issuperset(targets)]
        if stale:
            raise ConfigError(f"config_args.ALIASES names settings RunConfig lacks: {', '.join(stale)}")
        selection = None if selection is None else list(selection)
        self.fields = [field for field in every if _selected(field.path, selection)]
        self.flags = {field.path: _flags_of(field, every, reserved) for field in self.fields}
        self.dests = {path: flags[0][2:].replace("-", "_") for path, flags in self.flags.items()}

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        """Add every selected field's flags, one argument group per config section, values suppressed
        unless given."""
        groups = {}
        for field in self.fields:
            if field.section not in groups:
                groups[field.section] = parser.add_argument_group(f"{field.section} settings")
            add_field_flag(groups[field.section], field, *self.flags[field.path], dest=self.dests[field.path],
                           default=argparse.SUPPRESS)

    def given(self, namespace: argparse.Namespace) -> dict[str, object]:
        """Field path -> value for every flag the command line gave, with the paths aliases carry along."""
        given = {path: getattr(namespace, dest) for path, dest in self.dests.items() if hasattr(namespace, dest)}
        for _flag, (first, *others) in ALIASES.items():
            for path in others:
                if first in given and path in self.dests and path not in given:
                    given[path] = given[first]
        return given

    def apply(self, config: RunConfig, namespace: argparse.Namespace) -> RunConfig:
        """Lay the flags given over a base config.

        Args:
            config: the base, from a recipe file or the defaults (not changed).
            namespace: a parse of this parser's flags.
        Returns:
            A new RunConfig: `config` under the flags given; not validated.
        Raises:
            ConfigError: the combined settings do not form a RunConfig.
        """
        data = config.to_dict()
        for path, value in self.given(namespace).items():
            *sections, name = path.split(".")
            target = data
            for section in sections:
                target = target[section]
            target[name] = value
        return RunConfig.from_dict(data)

    def words(self, config: RunConfig) -> list[str]:
        """The fewest flags that turn the defaults into `config`, each under its first name (a historic alias or
        the short form): one per selected setting that differs from its default, plus any setting an alias would
        otherwise carry along with a value it does not have (`--seed 3` also sets calibration.seed).

        Args:
            config: the recipe to reproduce.
        Returns:
            Command-line words, e.g. ["--lr", "0.0003", "--no-distill"]; a parse of them applied to RunConfig()
            gives `config` back in every selected setting.
        Raises:
            ConfigError: a value the command line cannot spell so that it reads back the same (a list item with a
                comma, an optional text reading "none").
        """
        wanted = {field.path: _value_at(config, field.path) for field in self.fields}
        given = {field.path: wanted[field.path] for field in self.fields if wanted[field.path] != field.default}
        for first, *others in ALIASES.values():
            for path in (path for path in others if first in given and path in wanted):
                if wanted[path] == given[first]:
                    given.pop(path, None)  # the alias carries it along
                else:
                    given[path] = wanted[path]
        words = []
        for field in self.fields:
            if field.path in given:
                words += self._spelled(field, given[field.path])
        return words

    def _spelled(self, field: ConfigField, value) -> list[str]:
        flag = self.flags[field.path][0]
        if _optional(field.hint)[1] is bool:
            return [flag if value else _negative(flag)]
        text = _shown(value)
        if field.parse(text) != value:
            raise ConfigError(f"{field.path}: {value!r} has no command-line form that reads back the same; "
                              "use a recipe file (--config)")
        return [f"{flag}={text}"] if text.startswith("-") else [flag, text]  # argparse reads -1e-3 as an option

    def expose(self, namespace: argparse.Namespace, config: RunConfig) -> None:
        """Write every selected field's effective value onto the namespace under its flag's attribute
        (`args.eval_tokens`, `args.model`), so command bodies read the config the run uses."""
        for field in self.fields:
            setattr(namespace, self.dests[field.path], _value_at(config, field.path))
