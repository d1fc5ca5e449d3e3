"""The Ranks step's diagnostics as plotly figures: measured damage per layer and kept share, and one module's
whitened spectrum with the plan's rank cut. Pure functions of engine data, drawn on the theme's panel."""

from __future__ import annotations

import math

from lillama_core.planning.predict import energy_kept

from .charts import ACCENT, ACCENT_2, AXIS, DAMAGE, figure

MIN_SHOWN_KL = 1e-4  # nats: the colour scale's floor, so a near-zero probe does not stretch it


def damage_heatmap(ladder: dict[int, dict[float, float | None]], keeps: dict[int, float] | None = None) -> dict:
    """Layer x kept share, coloured by the measured KL (log scale); with `keeps`, the plan's share per layer marked.

    Args:
        ladder: layer -> kept share -> KL in nats per token (None or NaN: the probe's output was not finite).
        keeps: layer -> share of the layer's weights the plan keeps.
    """
    layers = sorted(ladder)
    shares = sorted({k for levels in ladder.values() for k in levels})
    z, text = [], []
    for layer in layers:
        row = [ladder[layer].get(k) for k in shares]
        finite = [v if v is not None and math.isfinite(v) else None for v in row]
        z.append([math.log10(max(v, MIN_SHOWN_KL)) if v is not None else None for v in finite])
        text.append([f"{v:.4f}" if v is not None else "not finite" for v in finite])
    x = [round(100 * k) for k in shares]
    data = [{"type": "heatmap", "x": x, "y": layers, "z": z, "text": text, "colorscale": "Viridis",
             "hovertemplate": "layer %{y}, %{x}% kept: KL %{text} nats<extra></extra>", "name": "measured",
             "colorbar": {"title": {"text": "log₁₀ KL"}, "thickness": 12}}]
    if keeps:
        marked = [layer for layer in layers if layer in keeps]
        data.append({"type": "scatter", "mode": "markers", "x": [100 * keeps[i] for i in marked], "y": marked,
                     "name": "plan", "hovertemplate": "layer %{y}: plan keeps %{x:.0f}%<extra></extra>",
                     "marker": {"color": ACCENT_2, "size": 9, "symbol": "diamond", "line": {"color": "#0f172a",
                                                                                           "width": 1}}})
    return figure(data, "Measured damage: each layer alone compressed (◆ the plan's keep)",
                  height=max(360, 120 + 16 * len(layers)),
                  xaxis={"title": {"text": "% of the layer's weights kept"}, "range": [0, 105]},
                  yaxis={"title": {"text": "layer"}, "autorange": "reversed", "dtick": 1 if len(layers) <= 16 else 2},
                  showlegend=False)


def spectrum_chart(name: str, singular_values, rank: int | None) -> dict:
    """One module's normalised squared singular values (log scale) and the cumulative share kept, with the
    plan's rank cut; the title names the share of energy the rank keeps.

    Args:
        name: the module's name.
        singular_values: descending (whitened where measured so).
        rank: the plan's rank for the module (None: dense).
    """
    energy = [float(s) ** 2 for s in singular_values]
    total = sum(energy) or 1.0
    share = [e / total for e in energy]
    x = list(range(1, len(share) + 1))
    cumulative, running = [], 0.0
    for value in share:
        running += value
        cumulative.append(100 * running)
    data = [{"type": "scatter", "mode": "lines", "x": x, "y": share, "name": "energy per direction",
             "line": {"color": ACCENT}},
            {"type": "scatter", "mode": "lines", "x": x, "y": cumulative, "name": "cumulative % (right)",
             "yaxis": "y2", "line": {"color": ACCENT_2, "dash": "dot"}}]
    shapes = []
    if rank is not None:
        shapes.append({"type": "line", "xref": "x", "yref": "paper", "x0": rank, "x1": rank, "y0": 0, "y1": 1,
                       "line": {"color": DAMAGE, "width": 2}})
    kept = f"rank {rank} keeps {100 * energy_kept(singular_values, rank):.1f}%" if rank else "dense: keeps 100%"
    return figure(data, f"{name}: {kept} of the whitened energy", height=360, shapes=shapes,
                  xaxis={"title": {"text": "singular direction"}},
                  yaxis={"type": "log", "title": {"text": "share of energy"}},
                  yaxis2={**AXIS, "overlaying": "y", "side": "right", "showgrid": False, "range": [0, 101],
                          "title": {"text": "cumulative %"}}, margin={"r": 60})
