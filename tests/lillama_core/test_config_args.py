import argparse
import dataclasses
import enum
import typing

import pytest

from lillama_core import config_args
from lillama_core.config import RunConfig
from lillama_core.config_args import ALIASES, ConfigArgs, ConfigField, add_field_flag, config_fields, parse_assignment
from lillama_core.errors import ConfigError


def _leaf_paths(cls=RunConfig, prefix=""):
    """Walked here rather than with config_fields, so a field the generator skips cannot hide."""
    hints = typing.get_type_hints(cls)
    for spec in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[spec.name]):
            yield from _leaf_paths(hints[spec.name], f"{prefix}{spec.name}.")
        else:
            yield prefix + spec.name


def _get(config, path):
    for part in path.split("."):
        config = getattr(config, part)
    return config


def _other_value(field: ConfigField) -> tuple[list[str], object]:
    """Command-line words that set the field to a value other than its default, and that value."""
    optional, hint = config_args._optional(field.hint)
    choices = config_args._choices(hint)
    if hint is bool:
        return ([field.flag] if not field.default else [config_args._negative(field.flag)]), not field.default
    if choices is not None:
        other = next(c for c in choices if c != field.default)
        return [field.flag, str(other)], other
    if typing.get_origin(hint) is dict:
        return [field.flag, '{"*.mlp.*": 3}'], {"*.mlp.*": 3}
    if typing.get_origin(hint) is list:
        return [field.flag, "attention, ssm"], ["attention", "ssm"]
    if optional and field.default is not None:
        return [field.flag, "none"], None
    value = {int: lambda: 7 + (field.default or 0), float: lambda: 0.125, str: lambda: "other-text"}[hint]()
    return [field.flag, str(value)], value


def _parser(selection=None, reserved=()):
    flags = ConfigArgs(selection, reserved)
    parser = argparse.ArgumentParser(prog="t", exit_on_error=False)
    flags.add_to(parser)
    return flags, parser


def test_config_fields_are_every_leaf_of_run_config():
    assert [f.path for f in config_fields()] == list(_leaf_paths())


@pytest.mark.parametrize("path", list(_leaf_paths()))
def test_every_config_field_has_a_flag_that_sets_it(path):
    flags, parser = _parser()
    field = next(f for f in flags.fields if f.path == path)
    words, expected = _other_value(field)
    assert expected != field.default
    args = parser.parse_args(words)
    assert flags.given(args)[path] == expected
    assert _get(flags.apply(RunConfig(), args), path) == expected


@pytest.mark.parametrize("path", list(_leaf_paths()))
def test_words_spell_any_one_setting_so_that_it_parses_back(path):
    flags, parser = _parser()
    field = next(f for f in flags.fields if f.path == path)
    config = flags.apply(RunConfig(), parser.parse_args(_other_value(field)[0]))
    words = flags.words(config)
    assert words and words[0] in flags.flags[path] + [config_args._negative(flags.flags[path][0])]
    assert flags.apply(RunConfig(), parser.parse_args(words)) == config


def test_words_of_the_defaults_are_none_and_a_value_starting_with_a_dash_is_joined_to_its_flag():
    flags, parser = _parser()
    assert flags.words(RunConfig()) == []
    config = RunConfig()
    config.model.name = "-odd-name"
    assert flags.words(config) == ["--model=-odd-name"]
    assert flags.apply(RunConfig(), parser.parse_args(flags.words(config))) == config


def test_nothing_given_means_nothing_changes():
    flags, parser = _parser()
    args = parser.parse_args([])
    assert flags.given(args) == {} and flags.apply(RunConfig(), args) == RunConfig()
    base = RunConfig()
    base.distill.lr = 0.5
    assert flags.apply(base, args).distill.lr == 0.5 and base.distill.lr == 0.5  # the base is not changed


def test_a_flag_equal_to_its_default_still_counts_as_given():
    flags, parser = _parser()
    base = RunConfig()
    base.distill.lr, base.model.offload = 0.5, True
    args = parser.parse_args(["--lr", str(RunConfig().distill.lr), "--no-offload"])
    config = flags.apply(base, args)
    assert config.distill.lr == RunConfig().distill.lr and config.model.offload is False


def test_seed_sets_both_seeds_unless_the_calibration_seed_is_given():
    flags, parser = _parser()
    both = flags.apply(RunConfig(), parser.parse_args(["--seed", "5"]))
    assert (both.seed, both.calibration.seed) == (5, 5)
    for words in (["--seed", "5", "--calibration.seed", "9"], ["--calibration.seed", "9", "--seed", "5"]):
        config = flags.apply(RunConfig(), parser.parse_args(words))
        assert (config.seed, config.calibration.seed) == (5, 9)


def test_aliases_short_forms_and_negations():
    flags, _ = _parser(reserved=("--temperature",))
    assert flags.flags["distill.lr"] == ["--lr", "--distill.lr"]
    assert flags.flags["distill.weight_decay"] == ["--weight-decay", "--distill.weight-decay"]  # unique name
    assert flags.flags["distill.warmup_steps"] == ["--distill.warmup-steps"]  # heal has one too
    assert flags.flags["heal.temperature"] == ["--heal.temperature"]  # reserved
    assert flags.flags["seed"] == ["--seed"]
    _, parser = _parser()
    assert parser.parse_args(["--model.no-offload"]).offload is False
    assert parser.parse_args(["--no-distill"]).distill is False
    assert parser.parse_args(["--no-keep-best"]).keep_best is False


def test_every_alias_names_fields_and_a_stale_one_fails_loudly(monkeypatch):
    paths = set(_leaf_paths())
    assert all(paths.issuperset(targets) for targets in ALIASES.values())
    monkeypatch.setitem(ALIASES, "--gone", ("distill.renamed_away",))
    with pytest.raises(ConfigError, match="--gone"):
        ConfigArgs()


def test_selection_limits_the_flags():
    flags, parser = _parser(("model", "calibration.source"))
    assert {f.path.split(".")[0] for f in flags.fields} == {"model", "calibration"}
    assert [f.path for f in flags.fields if f.path.startswith("calibration")] == ["calibration.source"]
    with pytest.raises(SystemExit):  # unrecognized
        parser.parse_args(["--lr", "0.1"])


@pytest.mark.parametrize("words, message", [
    (["--lr", "fast"], "distill.lr"),
    (["--rank", "2.5"], "plan.rank"),
    (["--overrides", "[1, 2]"], "JSON object"),
    (["--overrides", "{not json"], "plan.overrides"),
])
def test_bad_values_are_argparse_errors_naming_the_setting(words, message):
    _, parser = _parser()
    with pytest.raises(argparse.ArgumentError, match=message):
        parser.parse_args(words)


def test_optional_fields_accept_none():
    flags, parser = _parser()
    args = parser.parse_args(["--reduction", "None", "--grad-clip", "none", "--text-field", "null"])
    assert flags.given(args) == {"plan.reduction": None, "distill.grad_clip": None, "calibration.text_field": None}


class Colour(enum.StrEnum):
    RED = "red"
    BLUE = "blue"


@pytest.mark.parametrize("hint", [Colour, Colour | None, Colour | str, typing.Literal["red", "blue"]])
def test_enum_and_literal_fields_get_choices(hint, capsys):
    parser = argparse.ArgumentParser(prog="t", exit_on_error=False)
    add_field_flag(parser, ConfigField("paint.colour", hint, "red", "100% of the colour"), "--colour")
    assert parser.parse_args(["--colour", "blue"]).colour == "blue"
    with pytest.raises(argparse.ArgumentError, match="not one of red, blue"):
        parser.parse_args(["--colour", "green"])
    parser.print_help()  # a literal % in the help must not break argparse's formatting
    help_text = capsys.readouterr().out
    assert "{red,blue" in help_text and "100% of the colour (default: red)" in help_text


def test_a_type_without_a_command_line_form_is_refused():
    with pytest.raises(ConfigError, match="no command-line form"):
        ConfigField("x.y", tuple, (), "").parse("1")


def test_add_field_flag_keeps_a_callers_names_and_defaults():
    parser = argparse.ArgumentParser(prog="t")
    add_field_flag(parser, "eval.tokens", "--eval-tokens", default=8192, help="tokens scored after a run")
    add_field_flag(parser, "model.offload", "--offload")
    assert vars(parser.parse_args([])) == {"eval_tokens": 8192, "offload": False}
    assert vars(parser.parse_args(["--eval-tokens", "64", "--offload"])) == {"eval_tokens": 64, "offload": True}
    assert "tokens scored after a run (default: 8192)" in parser.format_help()
    with pytest.raises(ConfigError, match="unknown setting"):
        add_field_flag(parser, "eval.nothing")


@pytest.mark.parametrize("text, expected", [
    ("distill.lr=1e-3", ("distill.lr", 1e-3)),
    ("plan.rank=none", ("plan.rank", None)),
    ("distill.keep_best=false", ("distill.keep_best", False)),
    ('plan.overrides={"*.layers.0.*": null}', ("plan.overrides", {"*.layers.0.*": None})),
    ("plan.groups=attention,mlp", ("plan.groups", ["attention", "mlp"])),
    ("seed=3", ("seed", 3)),
])
def test_parse_assignment_types_the_value_as_its_field(text, expected):
    assert parse_assignment(text) == expected


@pytest.mark.parametrize("text, message", [
    ("distill.lr", "section.name=value"),
    ("distill.learning_rate=1", "unknown setting"),
    ("distill.epochs=two", "distill.epochs"),
    ("distill.keep_best=maybe", "true or false"),
])
def test_parse_assignment_errors(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_assignment(text)


def test_expose_writes_the_effective_values_under_each_flags_attribute():
    flags, parser = _parser(("model", "eval"))
    args = parser.parse_args(["--eval-tokens", "64"])
    config = RunConfig()
    config.model.name, config.eval.tokens = "from-recipe", 64
    flags.expose(args, config)
    assert (args.model, args.eval_tokens, args.eval_seq_len, args.offload) == ("from-recipe", 64, 512, False)
