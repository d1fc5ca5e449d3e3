import dataclasses
import json

import pytest

from lillama_core.config import CalibrationConfig, DistillConfig, PlanConfig, RunConfig
from lillama_core.errors import ConfigError


def test_run_config_round_trips_through_json(tmp_path):
    config = RunConfig()
    config.plan.overrides = {"*.layers.0.*": None, "*.mlp.down_proj": 64}
    config.distill.lr = 1e-3
    config.calibration.tokens = 1234
    path = tmp_path / "run.json"
    config.save(path)
    loaded = RunConfig.load(path)
    assert loaded == config
    assert loaded.plan.overrides["*.mlp.down_proj"] == 64


def test_unknown_setting_is_a_clear_error():
    data = RunConfig().to_dict()
    data["distill"]["learning_rate"] = 0.1
    with pytest.raises(ConfigError, match="learning_rate"):
        RunConfig.from_dict(data)


def test_malformed_json_is_a_config_error():
    with pytest.raises(ConfigError, match="not valid JSON"):
        RunConfig.from_json("{not json")


@pytest.mark.parametrize("part, message", [
    (PlanConfig(reduction=1.5), "between 0 and 1"),
    (PlanConfig(reduction=0.0), "between 0 and 1"),
    (PlanConfig(rank=0, reduction=None), "at least 1"),
    (PlanConfig(rank=-3, reduction=None), "at least 1"),
    (PlanConfig(rank=2.5, reduction=None), "whole number"),
    (PlanConfig(strategy="random"), "strategy"),
    (PlanConfig(groups=["attn"]), "groups"),
    (DistillConfig(lr=0), "above 0"),
    (DistillConfig(lr=-1e-4), "above 0"),
    (DistillConfig(init="magic"), "init"),
    (CalibrationConfig(tokens=0), "positive"),
    (CalibrationConfig(tokens=100, seq_len=256), "at least one sequence"),
])
def test_invalid_settings_are_rejected(part, message):
    with pytest.raises(ConfigError, match=message):
        part.validate()


def test_every_field_has_help_text():
    for cls in (CalibrationConfig, DistillConfig, PlanConfig):
        assert all(f.metadata.get("help") for f in dataclasses.fields(cls)), cls.__name__


def test_to_json_is_plain_json():
    assert json.loads(RunConfig().to_json())["model"]["name"] == "smollm2-135m-instruct"


def test_run_config_round_trips_through_yaml_chosen_by_suffix(tmp_path):
    config = RunConfig()
    config.plan.overrides = {"*.layers.0.*": None}
    config.distill.lr, config.heal.tokens, config.plan.reduction = 3e-4, 512, None
    config.plan.rank = 64
    for name in ("recipe.yaml", "recipe.YML"):
        config.save(tmp_path / name)
        assert not (tmp_path / name).read_text().lstrip().startswith("{")  # YAML, not JSON
        assert RunConfig.load(tmp_path / name) == config
    config.save(tmp_path / "config.json")
    assert json.loads((tmp_path / "config.json").read_text())["distill"]["lr"] == 3e-4


def test_yaml_reads_exponent_floats_as_numbers():
    # PyYAML's YAML 1.1 rules read `3e-4` (no dot) as a string; a recipe means the number
    config = RunConfig.from_yaml("distill:\n  lr: 3e-4\n  weight_decay: 1E-2\nheal:\n  lr: .5\n")
    assert (config.distill.lr, config.distill.weight_decay, config.heal.lr) == (3e-4, 1e-2, 0.5)
    assert RunConfig.from_yaml("calibration:\n  tokens: 1000\n").calibration.tokens == 1000


@pytest.mark.parametrize("text, message", [
    ("distill: [unclosed", "not valid YAML"),
    ("plan:\n  target: 0.2\n", "target"),
    ("- a list\n", "expects an object"),
    ("seed: !!python/object:os.system {}\n", "not valid YAML"),  # safe loading only
])
def test_bad_yaml_recipes_are_config_errors(text, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_yaml(text)


def test_a_missing_config_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        RunConfig.load(tmp_path / "absent.yaml")


def test_a_config_json_from_before_the_rename_of_distill_to_train_still_loads(tmp_path):
    data = RunConfig().to_dict()
    del data["distill"]["train"]
    data["distill"]["distill"] = False  # how older run folders wrote "factorise only"
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    loaded = RunConfig.load(path)
    assert loaded.distill.train is False
    assert "distill" not in loaded.to_dict()["distill"] and loaded.to_dict()["distill"]["train"] is False


def test_closed_sets_are_enums_in_python_and_plain_strings_in_json():
    from lillama_core.config import ActivationStorage, Init, LossPath, Strategy

    config = RunConfig(plan=PlanConfig(strategy="energy"), distill=DistillConfig(init="svd", loss="student",
                                                                                  activations="disk"))
    text = config.to_json()
    data = json.loads(text)
    assert (data["plan"]["strategy"], data["distill"]["init"], data["distill"]["loss"],
            data["distill"]["activations"]) == ("energy", "svd", "student", "disk")
    assert '"strategy": "energy"' in text and "Strategy" not in text
    loaded = RunConfig.from_json(text)
    assert loaded.plan.strategy is Strategy.ENERGY and loaded.distill.init is Init.SVD
    assert loaded.distill.loss is LossPath.STUDENT and loaded.distill.activations is ActivationStorage.DISK
    assert loaded == config  # members equal the plain strings they came from
    assert RunConfig().to_dict()["plan"]["strategy"] == "sensitivity"


def test_an_unknown_init_or_loss_path_is_one_config_error():
    with pytest.raises(ConfigError, match="init must be one of whitened, svd, random, not 'pca'"):
        DistillConfig(init="pca").validate()
    with pytest.raises(ConfigError, match="loss must be one of joint, teacher, student"):
        RunConfig.from_dict({"distill": {"loss": "both"}}).validate()


def test_every_config_class_documents_each_field_with_its_help_text():
    import dataclasses

    from lillama_core.config import CalibrationConfig, EvalConfig, HealConfig, ModelConfig

    for cls in (ModelConfig, CalibrationConfig, PlanConfig, DistillConfig, HealConfig, EvalConfig):
        for f in dataclasses.fields(cls):
            assert f"    {f.name}: {f.metadata['help']}; default " in cls.__doc__, (cls.__name__, f.name)
    assert "    plan: a PlanConfig" in RunConfig.__doc__
