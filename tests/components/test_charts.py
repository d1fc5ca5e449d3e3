from components.charts import (
    MAX_POINTS_PER_SERIES,
    duration,
    human,
    human_bytes,
    layer_table,
    loss_chart,
    memory_chart,
    pareto_front,
    plan_chart,
    run_progress,
    throughput_chart,
    tradeoff_chart,
)
from lillama_core.events import LayerFinished, LayerStarted, RunFinished, RunStarted, Step


def _step(layer, s, steps, g, total, **more):
    return Step(layer=layer, step=s, steps=steps, global_step=g, steps_total=total, loss_teacher_input=0.5 / s,
                loss_student_input=0.6 / s, lr=1e-3, tokens_per_s=100.0 * s, elapsed_s=g, eta_s=10.0 - g,
                torch_peak_allocated_bytes=2**30, **more)


def _events(layers=2, steps=3, finish=True):
    events = [RunStarted(model="m", device="cpu", layers_total=4, layers_to_compress=list(range(layers)),
                         steps_total=layers * steps, tokens=1000, params_before=100, params_after=80)]
    g = 0
    for layer in range(layers):
        events.append(LayerStarted(layer=layer, position=layer + 1, of=layers,
                                   modules={"mlp.up_proj": 8, "mlp.down_proj": 4}, steps=steps))
        for s in range(1, steps + 1):
            g += 1
            events.append(_step(layer, s, steps, g, layers * steps))
        if finish or layer < layers - 1:
            events.append(LayerFinished(layer=layer, init_loss=0.7, best_loss=0.2, final_loss_teacher_input=0.25,
                                        final_loss_student_input=0.3, best_step=steps, seconds=12.0,
                                        params_before=1000, params_after=400))
    if finish:
        events.append(RunFinished(status="completed", layers_done=list(range(layers)), seconds=30.0, tokens=1000))
    return events


def test_loss_chart_has_both_paths_for_every_layer():
    fig = loss_chart(_events(layers=3))
    assert len(fig["data"]) == 6
    assert [len(t["x"]) for t in fig["data"]] == [3] * 6
    assert fig["layout"]["yaxis"]["type"] == "log"
    assert fig["data"][1]["line"]["dash"] == "dot"  # the student-input path


def test_long_series_are_thinned_but_keep_the_last_point():
    fig = loss_chart(_events(layers=1, steps=5000))
    assert len(fig["data"][0]["x"]) <= MAX_POINTS_PER_SERIES + 1
    assert fig["data"][0]["x"][-1] == 5000


def test_progress_and_table_follow_the_events():
    running = _events(layers=2, finish=False)
    progress = run_progress(running)
    assert progress["fraction"] == 1.0 or progress["status"] == "running"
    assert progress["layer"] == 1 and progress["position"] == "2/2"
    table = layer_table(running)
    assert list(table["state"]) == ["done", "running"]
    assert table.loc[0, "params kept"] == "40%" and table.loc[0, "rank"] == "4–8"
    done = run_progress(_events())
    assert done["fraction"] == 1.0 and done["status"] == "completed" and done["eta_s"] == 0.0
    stopped = running + [RunFinished(status="stopped", layers_done=[0], seconds=10.0, tokens=1000)]
    assert list(layer_table(stopped)["state"]) == ["done", "stopped (kept dense)"]


def test_throughput_and_memory_charts():
    assert throughput_chart(_events())["data"][0]["y"] == [100.0, 200.0, 300.0] * 2
    assert "CPU" in memory_chart(_events())["layout"]["title"]["text"]


def test_cpu_memory_chart_plots_resident_memory_now_and_marks_the_runs_peak():
    events = _events()  # six steps
    resident = [1.0, 3.0, 2.0, 1.5, 1.25, 1.0]  # GiB: it falls again after the peak
    steps = [e for e in events if isinstance(e, Step)]
    for step, gib in zip(steps, resident, strict=True):
        step.rss_bytes = int(gib * 2**30)
        step.torch_peak_allocated_bytes = 2**40  # a lifetime high-water mark from an earlier run: not plotted
    fig = memory_chart(events)
    assert fig["data"][0]["name"] == "resident memory" and fig["data"][0]["y"] == resident
    peak = fig["data"][1]
    assert peak["name"] == "run peak" and (peak["x"], peak["y"], peak["text"]) == ([2], [3.0], [human_bytes(3 * 2**30)])
    assert "run's peak" in fig["layout"]["title"]["text"]


def test_memory_chart_of_an_older_log_without_resident_memory():
    from lillama_core.events import event_from_dict

    old = {key: value for key, value in _events()[2].to_dict().items() if key != "rss_bytes"}
    step = event_from_dict(old)  # as read back from an events.jsonl written before the field existed
    assert step.rss_bytes is None
    fig = memory_chart([step])
    assert fig["data"][0]["y"] == [1.0] and "older log" in fig["layout"]["title"]["text"]
    assert memory_chart([])["data"][0]["y"] == []  # nothing yet: an empty chart, no error


def test_plan_chart_and_budget_line():
    layers = [{"layer": 0, "params_before": 10, "params_after": 6},
              {"layer": 1, "params_before": 10, "params_after": 10}]
    fig = plan_chart(layers, budget_after=14)
    assert [t["y"] for t in fig["data"]] == [[10, 10], [6, 10]]
    assert fig["layout"]["shapes"][0]["y0"] == 7


def test_pareto_front_keeps_only_unbeaten_points():
    points = [(10, 5.0), (8, 6.0), (9, 7.0), (12, 4.0), (8, 6.5)]
    assert pareto_front(points) == [1, 0, 3]
    fig = tradeoff_chart([{"params_after": x, "student_ppl": y, "teacher_ppl": 3.0} for x, y in points])
    assert fig["data"][1]["x"] == [8, 10, 12]


def test_formatting():
    assert human(134_515_008) == "134.5M" and human(None) == "–"
    assert human_bytes(3 * 2**30) == "3.0 GiB"
    assert duration(3725) == "1h02m" and duration(65) == "1m05s" and duration(float("nan")) == "–"


def test_figures_are_plain_json_that_plotly_accepts():
    import json

    import plotly.graph_objects as go

    from components.charts import comparison_chart

    rows = [{"model": "teacher", "perplexity": 30.0, "parameters": 10, "weight_bytes": 40,
             "generate_tokens_per_s": 5.0},
            {"model": "student", "perplexity": 35.0, "parameters": 8, "weight_bytes": 32,
             "generate_tokens_per_s": 6.0}]
    events = _events()
    for fig in (loss_chart(events), throughput_chart(events), memory_chart(events), comparison_chart(rows),
                plan_chart([{"layer": 0, "params_before": 1, "params_after": 1}], 1), tradeoff_chart([])):
        go.Figure(json.loads(json.dumps(fig)))  # raises on any property plotly does not know


def test_healing_steps_chart_as_one_kl_curve_and_old_logs_still_do():
    from lillama_core.events import StepStage, event_from_dict

    heal = [_step(-1, s, 2, s, 2, stage=StepStage.HEAL) for s in (1, 2)]
    names = [trace["name"] for trace in loss_chart(_events(layers=1) + heal)["data"]]
    assert names.count("healing KL") == 1 and "L-1 teacher-input" not in names
    old = []  # an events.jsonl from before Step.stage: healing was known by layer -1 alone
    for step in heal:
        data = step.to_dict()
        del data["stage"]
        old.append(event_from_dict(data))
    assert [e.stage for e in old] == ["heal", "heal"]
    assert [t["name"] for t in loss_chart(_events(layers=1) + old)["data"]] == names
    assert event_from_dict(_step(0, 1, 2, 1, 2).to_dict()).stage == StepStage.DISTILL


def test_every_chart_sits_on_the_themes_background():
    """Transparent panels, translucent grid lines and no near-black or white ink: the same figure reads on the
    light and the dark theme."""
    from components.charts import comparison_chart

    rows = [{"model": "teacher", "perplexity": 30.0, "parameters": 100, "weight_bytes": 400,
             "generate_tokens_per_s": 9.0}, {"model": "student", "perplexity": 40.0, "parameters": 80,
                                             "weight_bytes": 320, "generate_tokens_per_s": 11.0}]
    events = _events()
    figures = [plan_chart([{"layer": 0, "params_before": 10, "params_after": 6}], 7), loss_chart(events),
               throughput_chart(events), memory_chart(events), comparison_chart(rows),
               tradeoff_chart([{"params_after": 80, "student_ppl": 40.0, "teacher_ppl": 30.0}])]
    for fig in figures:
        layout = fig["layout"]
        assert layout["paper_bgcolor"] == layout["plot_bgcolor"] == "rgba(0,0,0,0)"
        axes = [value for key, value in layout.items() if key.startswith(("xaxis", "yaxis"))]
        assert axes and all(axis["gridcolor"].startswith("rgba(") for axis in axes)
        assert "white" not in str(fig).lower() and "#111827" not in str(fig) and "#fff" not in str(fig).lower()


def test_empty_tables_name_their_columns():
    from components.evaluate import table
    from components.explore import runs_table

    assert "loss T-in" in layer_table([]).columns
    assert list(runs_table([]).columns)[:2] == ["run", "status"]
    assert "perplexity" in table([]).columns
