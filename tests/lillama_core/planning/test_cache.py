import pytest
import torch
from tiny import tiny_llama, tiny_sequences

import lillama_core.planning.planner as planner
import lillama_core.planning.sensitivity as sensitivity
from lillama_core.config import PlanConfig
from lillama_core.data.calibration import CalibrationData
from lillama_core.events import Phase
from lillama_core.planning.cache import measurements_root, model_fingerprint
from lillama_core.planning.planner import make_plan

CONFIG = PlanConfig(strategy="sensitivity", reduction=0.1)


def _calibration(seed: int = 0):
    return CalibrationData(tiny_sequences(12, 32, seed=seed), "random", 0)


@pytest.fixture
def counted(monkeypatch):
    calls = []
    real = sensitivity.measure_sensitivity

    def measure(loaded, calibration, groups, keeps, **kwargs):
        calls.append(keeps)
        return real(loaded, calibration, groups, keeps, **kwargs)

    monkeypatch.setattr(sensitivity, "measure_sensitivity", measure)
    return calls


def test_a_second_plan_on_the_same_inputs_reuses_the_measurement(tiny, counted):
    first = make_plan(tiny, CONFIG, _calibration(), batch_size=4)
    events = []
    second = make_plan(tiny, CONFIG, _calibration(), batch_size=4, on_event=events.append)
    assert len(counted) == 1
    assert second.ranks == first.ranks
    assert any(isinstance(e, Phase) and "reusing the stored measurement" in e.detail for e in events)
    assert list(measurements_root().glob("sensitivity-*.json"))


def test_other_calibration_groups_or_weights_measure_again(tiny, counted):
    make_plan(tiny, CONFIG, _calibration(), batch_size=4)
    make_plan(tiny, CONFIG, _calibration(seed=1), batch_size=4)
    make_plan(tiny, PlanConfig(strategy="sensitivity", reduction=0.1, groups=["mlp"]), _calibration(), batch_size=4)
    make_plan(tiny_llama(layers=3, seed=1), CONFIG, _calibration(), batch_size=4)  # same name, other weights
    assert len(counted) == 4


def test_a_torn_entry_is_measured_again(tiny, counted):
    make_plan(tiny, CONFIG, _calibration(), batch_size=4)
    for entry in measurements_root().glob("sensitivity-*.json"):
        entry.write_text("{not json")
    assert make_plan(tiny, CONFIG, _calibration(), batch_size=4).ranks
    assert len(counted) == 2


def test_whitened_spectra_are_stored_and_reused(tiny, monkeypatch):
    calls = []
    real = planner.compute_spectra
    monkeypatch.setattr(planner, "compute_spectra", lambda *a, **k: calls.append(1) or real(*a, **k))
    config = PlanConfig(strategy="energy", reduction=0.15, whitened_energy=True)
    first = make_plan(tiny, config, _calibration(), batch_size=4)
    second = make_plan(tiny, config, _calibration(), batch_size=4)
    assert len(calls) == 1 and second.ranks == first.ranks
    assert list(measurements_root().glob("spectra-*.safetensors"))


def test_the_model_fingerprint_sees_a_changed_weight(tiny):
    before = model_fingerprint(tiny)
    with torch.no_grad():
        tiny.model.model.layers[0].mlp.up_proj.weight[0, 0] += 1.0
    assert model_fingerprint(tiny) != before


def test_a_deeper_target_measures_only_the_kept_shares_not_stored(tiny, counted):
    shallow = make_plan(tiny, CONFIG, _calibration(), batch_size=4)
    deep = make_plan(tiny, PlanConfig(strategy="sensitivity", reduction=0.6), _calibration(), batch_size=4)
    assert counted[0] == sensitivity.KEEP_LEVELS and len(counted) == 2
    assert counted[1] == (0.1,)  # only the deeper rung that target adds (probe_keeps)
    assert make_plan(tiny, CONFIG, _calibration(), batch_size=4).ranks == shallow.ranks
    assert make_plan(tiny, PlanConfig(strategy="sensitivity", reduction=0.6), _calibration(),
                     batch_size=4).ranks == deep.ranks
    assert len(counted) == 2


def test_the_probes_whitened_spectra_and_every_rung_are_kept_for_the_diagnostics(tiny, counted):
    from lillama_core.planning.planner import measure_for_plan
    from lillama_core.planning.ranks import ModelShape

    make_plan(tiny, PlanConfig(strategy="sensitivity", reduction=0.6), _calibration(), batch_size=4)
    measured = measure_for_plan(tiny, CONFIG, _calibration(), batch_size=4)
    assert len(counted) == 1  # the shallower target reads the deeper one's entry
    assert set(measured.damage[0]) == set(sensitivity.KEEP_LEVELS)  # what the plan is built from
    assert set(measured.ladder[0]) == set(sensitivity.KEEP_LEVELS) | {0.1}  # everything stored
    shape = ModelShape.of(tiny.model)
    assert set(measured.spectra) == {m.name for m in shape.modules}
    up = next(m for m in shape.modules if m.local_name == "mlp.up_proj")
    values = measured.spectra[up.name]
    assert values.shape == (up.full_rank,) and bool((values[:-1] >= values[1:]).all())
    assert list(measurements_root().glob("sensitivity-*.safetensors"))


def test_an_entry_stored_before_spectra_were_kept_is_measured_again_once(tiny, counted):
    make_plan(tiny, CONFIG, _calibration(), batch_size=4)
    for entry in measurements_root().glob("sensitivity-*.safetensors"):
        entry.unlink()
    make_plan(tiny, CONFIG, _calibration(), batch_size=4)
    make_plan(tiny, CONFIG, _calibration(), batch_size=4)
    assert len(counted) == 2 and set(counted[1]) == set(sensitivity.KEEP_LEVELS)
