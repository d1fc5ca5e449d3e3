"""The Ranks step's "why and what it will cost" section: the plan's predicted damage and perplexity, the measured
damage heat map and one module's whitened spectrum, redrawn whenever the plan's totals change."""

from __future__ import annotations

import html
import math

import gradio as gr

from .charts_ranks import damage_heatmap, spectrum_chart
from .common import plot
from .studio import Studio

HURT_MOST = 3  # layers named as the plan's costliest


def _percent_error(log_error: float | None) -> str:
    return f"±{math.exp(log_error) - 1:.0%}" if log_error is not None else "no error estimate yet"


def prediction_html(studio: Studio) -> str:
    """Cards: the plan's training-free damage, its predicted perplexity after distillation (each with its measured
    uncertainty) and the layers it costs most in; or what is missing for them."""
    damage = studio.plan_damage() if studio.loaded is not None else None
    if damage is None:
        why = (f"measuring: {html.escape(studio.plan_progress)}" if studio.measuring() else
               "apply the Sensitivity preset once (it is stored for this model and data) to see each layer's damage "
               "and a predicted quality")
        return f"<p class='plan-note' id='prediction-missing'>Prediction: {why}.</p>"
    points, fit = studio.quality_fit()
    cards = [("training-free damage", f"{damage.total:.3g} nats",
              f"KL from the teacher, layers added; interpolation {_percent_error(damage.log_error)}")]
    if fit is None:
        cards.append(("predicted perplexity after distillation", "–",
                      "calibrates on finished runs of this model: run one, or a sweep in step 6"))
    else:
        ratio = math.exp(fit.log_ratio(damage.total))
        teacher = points[0].teacher_ppl  # the newest run's measurement of the teacher
        cards.append(("predicted perplexity after distillation", f"{teacher * ratio:.1f}",
                      f"×{ratio:.2f} the teacher's {teacher:.1f}; {_percent_error(fit.loo_error)} "
                      f"(leave-one-out over {fit.runs} run{'s' if fit.runs != 1 else ''})"))
    worst = sorted(damage.per_layer.items(), key=lambda item: -item[1])[:HURT_MOST]
    cards.append(("costliest layers", ", ".join(f"L{layer}" for layer, _ in worst),
                  ", ".join(f"{value:.3g}" for _, value in worst) + " nats at the plan's keep"))
    return "<div class='totals' id='plan-prediction'>" + "".join(
        f"<div class='card'><div class='small'>{k}</div><div class='big'>{v}</div><div class='small'>{d}</div></div>"
        for k, v, d in cards) + "</div>"


def heatmap(studio: Studio):
    damage = studio.plan_damage() if studio.loaded is not None else None
    if damage is None:
        return None
    return plot(damage_heatmap(studio.measurements.ladder, damage.keeps))


def module_choices(studio: Studio) -> list[tuple[str, str]]:
    """(label, module name) of every module with a stored spectrum, in the model's order."""
    spectra = studio.measurements.spectra or {}
    if studio.shape is None:
        return []
    return [(f"L{m.layer} {m.local_name}", m.name) for m in studio.shape.modules if m.name in spectra]


def spectrum(studio: Studio, name: str | None):
    spectra = studio.measurements.spectra or {}
    if studio.loaded is None or name not in spectra:
        return None
    return plot(spectrum_chart(name, spectra[name].tolist(), studio.current_plan().ranks.get(name)))


def refresh(studio: Studio, name: str | None) -> tuple:
    """(prediction cards, heat map, spectrum, module picker) for the plan as it is now; `name`: the module picked."""
    choices = module_choices(studio)
    names = [value for _, value in choices]
    if name not in names:  # first open, or another model: the first module the plan compresses
        ranks = studio.current_plan().ranks if names else {}
        name = next((n for n in names if n in ranks), names[0] if names else None)
    return (prediction_html(studio), heatmap(studio), spectrum(studio, name),
            gr.update(choices=choices, value=name))


def build(studio: Studio, totals: gr.HTML) -> None:
    """The section's layout, redrawn whenever `totals` (the plan's totals) changes or another module is picked."""
    gr.Markdown("#### Why this plan, and what it will cost")
    prediction = gr.HTML(elem_id="prediction")
    with gr.Row(equal_height=False):
        with gr.Column(scale=1):
            heat = gr.Plot(show_label=False, elem_id="damage-heatmap")
        with gr.Column(scale=1):
            pick = gr.Dropdown([], label="Spectrum of module", elem_id="spectrum-module")
            spec = gr.Plot(show_label=False, elem_id="spectrum-chart")
    totals.change(lambda name: refresh(studio, name), [pick], [prediction, heat, spec, pick],
                  show_progress="hidden", api_name="diagnostics")
    pick.input(lambda name: spectrum(studio, name), [pick], [spec], show_progress="hidden", api_name="spectrum")
