import math

from components.charts import TRANSPARENT, plan_chart
from components.charts_ranks import damage_heatmap, spectrum_chart


def test_the_heat_map_colours_log_kl_and_leaves_a_probe_that_was_not_finite_blank():
    fig = damage_heatmap({0: {0.6: 0.1, 0.2: float("nan")}, 1: {0.6: 0.01, 0.2: 1.0}}, {0: 1.0, 1: 0.6})
    heat, marks = fig["data"]
    assert heat["x"] == [20, 60] and heat["y"] == [0, 1]
    assert heat["z"][0][0] is None and heat["text"][0][0] == "not finite"
    assert math.isclose(heat["z"][1][0], 0.0) and math.isclose(heat["z"][1][1], -2.0)
    assert marks["x"] == [100.0, 60.0]
    assert fig["layout"]["paper_bgcolor"] == TRANSPARENT  # drawn on the theme's panel, light or dark


def test_the_spectrum_cuts_at_the_plans_rank_and_names_the_energy_kept():
    fig = spectrum_chart("m", [3.0, 2.0, 1.0], 1)
    assert fig["layout"]["shapes"][0]["x0"] == 1 and "rank 1 keeps 64.3%" in fig["layout"]["title"]["text"]
    assert fig["data"][1]["y"][-1] == 100.0
    assert "dense: keeps 100%" in spectrum_chart("m", [3.0, 2.0, 1.0], None)["layout"]["title"]["text"]


def test_the_budget_chart_draws_the_predicted_damage_on_its_own_axis():
    layers = [{"layer": 0, "params_before": 10, "params_after": 10}, {"layer": 1, "params_before": 10,
                                                                      "params_after": 5}]
    fig = plan_chart(layers, 15, {0: 0.0, 1: 0.3})
    assert fig["data"][2]["yaxis"] == "y2" and fig["data"][2]["y"] == [0.0, 0.3]
    assert fig["layout"]["yaxis2"]["overlaying"] == "y"
    assert len(plan_chart(layers, 15)["data"]) == 2
