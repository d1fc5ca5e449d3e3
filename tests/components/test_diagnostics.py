import json
import re
from dataclasses import replace

from components import diagnostics
from components.ranks import ranks_for_keep
from lillama_core.config import PlanConfig
from lillama_core.runtime.atomic import write_json


def _finished_run(studio, name: str, keep: float, student_ppl: float, status: str = "completed", **changes):
    """A run folder as a finished compression leaves it: config, plan, metrics and status."""
    folder = studio.jobs.runs_root / name
    folder.mkdir(parents=True)
    config = studio.run_config()
    write_json(folder / "config.json", replace(config, **changes).to_dict() if changes else config.to_dict())
    ranks = {name: rank for name, rank in ranks_for_keep(studio.shape.modules, 100 * keep).items() if rank}
    write_json(folder / "plan.json", {"ranks": ranks})
    write_json(folder / "metrics.json", {"teacher_ppl": 40.0, "student_ppl": student_ppl})
    write_json(folder / "status.json", {"status": status})


def _number(label: str, html: str) -> float:
    """The big number of the card named `label`."""
    return float(re.search(re.escape(label) + r"</div><div class='big'>([0-9.e+-]+)", html).group(1))


def test_a_slider_move_changes_the_predicted_damage_and_perplexity(measuring_studio):
    studio = measuring_studio()
    assert "apply the Sensitivity preset" in diagnostics.prediction_html(studio)
    studio.apply_preset(PlanConfig(reduction=0.1))
    assert "calibrates on finished runs" in diagnostics.prediction_html(studio)  # no run in the history yet
    _finished_run(studio, "a", 0.7, 44.0)
    _finished_run(studio, "b", 0.4, 60.0)
    _finished_run(studio, "c", 0.2, 90.0)
    _finished_run(studio, "failed", 0.2, 9.0, status="failed")  # left out: not finished, another model,
    _finished_run(studio, "other", 0.2, 9.0, model=replace(studio.model_config, name="another"))  # training-free
    _finished_run(studio, "free", 0.2, 9.0, distill=replace(studio.distill, train=False))
    before = diagnostics.prediction_html(studio)
    assert "leave-one-out over 3 runs" in before

    layer_0 = [m for m in studio.shape.modules if m.layer == 0]
    studio.set_ranks(ranks_for_keep(layer_0, 20))  # what releasing layer 0's slider at 20% does
    prediction, heat, spectrum, picker = diagnostics.refresh(studio, None)
    for label in ("training-free damage", "predicted perplexity after distillation"):
        assert _number(label, prediction) > _number(label, before)
    assert heat is not None and spectrum is not None and picker["value"] in studio.current_plan().ranks


def test_the_heat_map_marks_the_plans_keep_and_the_spectrum_its_rank_cut(measuring_studio):
    studio = measuring_studio()
    studio.apply_preset(PlanConfig(reduction=0.1))
    heat = json.loads(diagnostics.heatmap(studio).plot)
    keeps = studio.plan_damage().keeps
    assert heat["data"][1]["y"] == sorted(keeps) and heat["data"][1]["x"] == [100 * keeps[i] for i in sorted(keeps)]
    assert len(heat["data"][0]["z"]) == studio.shape.num_layers

    name = next(iter(studio.current_plan().ranks))
    chart = json.loads(diagnostics.spectrum(studio, name).plot)
    rank = studio.current_plan().ranks[name]
    assert chart["layout"]["shapes"][0]["x0"] == rank and f"rank {rank} keeps" in chart["layout"]["title"]["text"]
