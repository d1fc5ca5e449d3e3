"""Panel 2: the rank editor. Presets, one slider per layer and module group, per-module ranks for a
chosen layer, live totals, a chart of parameters (and predicted damage) per layer against the budget, and the
diagnostics and quality prediction (diagnostics.py)."""

from __future__ import annotations

import html
import math
import tempfile
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import gradio as gr

from lillama_core.config import GROUPS, PlanConfig
from lillama_core.planning.ranks import ModelShape, ModuleShape
from lillama_core.planning.strategies import all_strategies

from . import diagnostics
from .charts import human, human_bytes, plan_chart
from .common import plot, user_errors
from .settings import PresetSettings
from .studio import Studio

if TYPE_CHECKING:  # the controller imports this module's helpers
    from .controller import Controller
RANK_MULTIPLES = [1, 8, 16, 32, 64]


def totals_html(studio: Studio) -> str:
    summary = studio.summary()
    target = studio.plan_config.reduction
    budget = f"target {target:.0%}" if target and studio.plan.strategy != "custom" else "custom plan"
    cards = [
        ("parameters", f"{human(summary.params_before)} → {human(summary.params_after)}",
         f"{summary.params_before:,} → {summary.params_after:,}"),
        ("reduction", f"{summary.reduction:.1%}", budget),
        ("weight memory", f"{human_bytes(summary.weight_bytes_after)}",
         f"teacher {human_bytes(summary.weight_bytes_before)}"),
        ("modules compressed", f"{len(studio.plan.ranks)} / {len(studio.shape.modules)}",
         f"{sum(1 for r in summary.layers if r['compressed'])} layers touched"),
    ]
    html = "<div class='totals'>" + "".join(
        f"<div class='card'><div class='small'>{k}</div><div class='big'>{v}</div><div class='small'>{d}</div></div>"
        for k, v, d in cards) + "</div>"
    if summary.warnings:
        shown = "<br>".join(summary.warnings[:6]) + (f"<br>… and {len(summary.warnings) - 6} more"
                                                      if len(summary.warnings) > 6 else "")
        html += f"<p class='warn'>⚠ ranks that save nothing: {shown}</p>"
    return html


def planning_note(studio: Studio) -> str:
    """A line over the totals while the plan shown is the provisional one, with the measurement's progress."""
    if studio.provisional is None or studio.plan is not studio.provisional:
        return ""
    return (f"<p class='plan-note'>Provisional {studio.plan.strategy} plan, shown while the "
            f"{studio.plan_config.strategy} plan is made: {html.escape(studio.plan_progress)}. It replaces this one "
            f"when ready.</p>")


def chart(studio: Studio):
    summary = studio.summary()
    target = studio.plan_config.reduction
    budget = None
    if target and studio.plan.strategy != "custom":  # what the layers may keep for the target to hold
        budget = sum(r["params_before"] for r in summary.layers) - math.ceil(target * summary.params_before)
    damage = studio.plan_damage()
    return plot(plan_chart(summary.layers, budget, damage.per_layer if damage else None))


def group_picker(studio: Studio) -> dict:
    """Choices and value of the groups checkbox: the module groups this model has, each labelled with how
    many linear layers it holds (what the rank editor can touch), ticked where the plan compresses them."""
    if studio.shape is None:
        choices = [(group, group) for group in GROUPS]
    else:
        counts = Counter(m.group for m in studio.shape.modules)
        choices = [(f"{group} ({counts[group]})", group) for group in GROUPS if counts[group]]
    offered = {value for _, value in choices}
    return {"choices": choices, "value": [g for g in studio.plan_config.groups if g in offered]}


def group_keep(studio: Studio, modules: list[ModuleShape]) -> int:
    """Percent of the group's dense weights the plan keeps (100 = dense)."""
    ranks = studio.current_plan().ranks
    before = sum(m.dense_params for m in modules)
    after = sum(m.lowrank_params(ranks[m.name]) if m.name in ranks else m.dense_params for m in modules)
    return round(100 * after / before)


def ranks_for_keep(modules: list[ModuleShape], keep_percent: float) -> dict[str, int | None]:
    """Ranks that keep about keep_percent of each module; dense where that would save nothing."""
    out = {}
    for m in modules:
        rank = m.rank_for_keep(keep_percent / 100)
        out[m.name] = rank if keep_percent < 100 and rank <= m.max_saving_rank else None
    return out


def layer_titles(shape: ModelShape) -> dict[int, str]:
    """ "layer 3", or "layer 3 · decoder 1" where the model has several stacks (an encoder and a decoder)."""
    blocks = {m.layer: m.name[: -len(m.local_name) - 1] for m in shape.modules}
    stacks = {block.rpartition(".")[0] for block in blocks.values()}
    titles = {}
    for layer in range(shape.num_layers):
        stack, _, index = blocks.get(layer, "").rpartition(".")
        owner = next((part for part in reversed(stack.split(".")) if part not in ("layers", "layer", "blocks")), "")
        titles[layer] = f"layer {layer} · {owner} {index}" if len(stacks) > 1 and owner else f"layer {layer}"
    return titles


def shown_plan(studio: Studio, current_version: int) -> tuple:
    """The Ranks panel's outputs (totals, chart, version, then the preset inputs) for the plan as the server
    holds it: it may have changed from another tab or the API. Nothing changes before a model is loaded."""
    if studio.loaded is None:
        return (gr.skip(),) * 9
    studio.start_planning()
    config = studio.plan_config
    return (totals_html(studio), chart(studio), current_version + 1, config.strategy,
            round(100 * (config.reduction or 0.2)), round(100 * config.layer_keep), config.rank or 0,
            gr.update(**group_picker(studio)), config.rank_multiple)


def _preset_controls(studio: Studio) -> dict:
    """The preset form and its buttons (the left column over the chart)."""
    with gr.Row():
        strategy = gr.Dropdown([(s.label, s.name) for s in all_strategies()], value=studio.plan_config.strategy,
                               label="Preset")
        reduction = gr.Slider(1, 70, value=round(100 * (studio.plan_config.reduction or 0.2)), step=1,
                              label="Target reduction (% of all parameters)")
    with gr.Row():
        layer_keep = gr.Slider(5, 95, value=round(100 * studio.plan_config.layer_keep), step=5,
                               label="Bottom/top: % of weights kept in each chosen layer")
        fixed_rank = gr.Number(value=None, precision=0, label="Fixed rank (0 = use the target)")
        multiple = gr.Dropdown(RANK_MULTIPLES, value=studio.plan_config.rank_multiple,
                               label="Round ranks to a multiple of", allow_custom_value=True,
                               info="8: no quality cost and faster matrix kernels; 1: exact ranks")
        groups = gr.CheckboxGroup(**group_picker(studio), label="Module groups (linear layers each)")
    with gr.Row():
        apply = gr.Button("Apply preset", variant="primary")
        save = gr.DownloadButton("Save plan JSON")
        load = gr.UploadButton("Load plan JSON", file_types=[".json"])
    return {"strategy": strategy, "reduction": reduction, "layer_keep": layer_keep, "fixed_rank": fixed_rank,
            "multiple": multiple, "groups": groups, "apply": apply, "save": save, "load": load}


def _layout(studio: Studio) -> dict:
    """The panel above the layer sliders: preset controls, plan note, totals and the chart."""
    with gr.Row(equal_height=False):
        with gr.Column(scale=2):
            c = _preset_controls(studio)
        with gr.Column(scale=3):
            c["note"] = gr.HTML(elem_id="plan-note")
            c["totals"] = gr.HTML()
    c["plot"] = gr.Plot(show_label=False, elem_id="plan-chart")
    diagnostics.build(studio, c["totals"])
    gr.Markdown("#### Layers — % of weights kept per group (100 = dense); release a slider to apply")
    return c


def _refresh(studio: Studio) -> tuple:
    return totals_html(studio), chart(studio)


def _layer_sliders(studio: Studio, shape: ModelShape, titles: dict[int, str], outputs: list) -> None:
    """One slider per layer and module group; releasing one sets the group's ranks to keep that percent."""
    with gr.Column(elem_classes=["layer-grid"]):
        for layer in range(shape.num_layers):
            with gr.Row(elem_classes=["layer-row"], equal_height=True):
                gr.Markdown(f"**{titles[layer]}**", min_height=0)
                for group in studio.plan_config.groups:
                    modules = [m for m in shape.modules if m.layer == layer and m.group == group]
                    if not modules:
                        continue
                    slider = gr.Slider(5, 100, value=group_keep(studio, modules), step=1, label=group,
                                       key=f"g-{layer}-{group}", interactive=True)

                    def on_group(value, modules=modules):
                        studio.set_ranks(ranks_for_keep(modules, value))
                        return _refresh(studio)

                    slider.release(user_errors(on_group), slider, outputs, show_progress="hidden")


def _module_sliders(studio: Studio, shape: ModelShape, layer: int, outputs: list) -> None:
    """One rank slider per module of the chosen layer."""
    ranks = studio.current_plan().ranks
    with gr.Row():
        for m in (m for m in shape.modules if m.layer == layer):
            slider = gr.Slider(0, m.full_rank, value=ranks.get(m.name, 0), step=1,
                               label=f"{m.local_name} ({m.out_features}×{m.in_features})",
                               info=f"saves below {m.max_saving_rank + 1}", key=f"m-{m.name}", interactive=True)

            def on_module(value, name=m.name):
                studio.set_ranks({name: int(value) or None})
                return _refresh(studio)

            slider.release(user_errors(on_module), slider, outputs, show_progress="hidden")


def _render_editor(studio: Studio, version: gr.State, outputs: list) -> None:
    """The layer sliders and the per-module editor, drawn again whenever `version` changes."""
    @gr.render(inputs=[version])
    def draw(_version):
        if studio.loaded is None:
            gr.Markdown("Load a model in step 1 (or press *Apply preset* to load the default).")
            return
        shape = studio.shape
        titles = layer_titles(shape)
        _layer_sliders(studio, shape, titles, outputs)
        gr.Markdown("#### Modules of one layer — rank per module (0 = keep dense)")
        layer_pick = gr.Dropdown([(titles[i], i) for i in range(shape.num_layers)], value=0, label="Layer",
                                 key="layer-pick")

        @gr.render(inputs=[layer_pick])
        def draw_modules(layer):
            _module_sliders(studio, shape, layer, outputs)


def _wire_preset(controller: Controller, c: dict, version: gr.State) -> None:
    """Apply a preset, save the plan as JSON, load one."""
    studio = controller.studio

    @user_errors
    def on_apply(strategy_value, reduction_value, keep_value, rank_value, group_values, current_version,
                 multiple_value=PlanConfig.rank_multiple):
        settings = PresetSettings(strategy_value, reduction_value, keep_value, rank_value, tuple(group_values),
                                  multiple_value)
        return (*controller.apply_preset(settings), current_version + 1)

    c["apply"].click(on_apply, [c["strategy"], c["reduction"], c["layer_keep"], c["fixed_rank"], c["groups"], version,
                                c["multiple"]],
                     [c["totals"], c["plot"], version],
                     concurrency_id="model", concurrency_limit=1, api_name="apply_preset")

    def on_save():
        path = Path(tempfile.mkdtemp()) / "rank_plan.json"
        studio.current_plan().save(path)
        return str(path)

    c["save"].click(user_errors(on_save), None, c["save"], api_name="save_plan")

    @user_errors
    def on_load(file, current_version):
        studio.load_plan_json(Path(file).read_text())
        gr.Info(f"loaded a plan with {len(studio.plan.ranks)} low-rank modules")
        return (*_refresh(studio), current_version + 1)

    c["load"].upload(on_load, [c["load"], version], [c["totals"], c["plot"], version], api_name="load_plan")


def build(controller: Controller) -> dict:
    studio = controller.studio
    version = gr.State(0)  # bumped when the whole plan changes, so the sliders are drawn again
    c = _layout(studio)
    _render_editor(studio, version, [c["totals"], c["plot"]])
    _wire_preset(controller, c, version)

    def on_show(current_version):
        return shown_plan(studio, current_version)

    shown = [c["totals"], c["plot"], version, c["strategy"], c["reduction"], c["layer_keep"], c["fixed_rank"],
             c["groups"], c["multiple"]]
    follow_background_plan(studio, c["note"], shown)

    return {"on_show": (on_show, [version], shown)}


def follow_background_plan(studio: Studio, note: gr.HTML, shown: list) -> None:
    """While the measured plan is made in the background, show its progress in `note` once a second; when it
    replaces the provisional plan, redraw the panel (`shown`: shown_plan's outputs, the version state third)."""
    seen = gr.State(studio.plan_generation)

    def on_tick(current_version, seen_generation):
        if studio.plan_generation == seen_generation:
            return (planning_note(studio), *(gr.skip(),) * len(shown), seen_generation)
        return (planning_note(studio), *shown_plan(studio, current_version), studio.plan_generation)

    gr.Timer(1.0).tick(on_tick, [shown[2], seen], [note, *shown, seen], show_progress="hidden",
                       concurrency_limit=None, api_visibility="private")
