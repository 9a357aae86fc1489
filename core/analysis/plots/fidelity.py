"""Gradient fidelity: layer x setting heatmaps, bars, and fidelity over training."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go

from .common import FONT_SIZE, PALETTE, TICK_SIZE, _colors, _legend_below, _note_above, _plain, base_layout

FIDELITY_METRIC_LABELS = {"cosine": "cosine similarity", "rel_error": "relative L2 error",
                          "sign_agreement": "sign agreement", "projection": "projection ratio ⟨g̃,g⟩/‖g‖²",
                          "norm_ratio": "norm ratio ‖g̃‖/‖g‖", "bias": "bias ‖mean(g̃)−g‖/‖g‖",
                          "bias_floor": "bias the draws' noise explains"}


def _fidelity_scale(metric: str, values) -> dict:
    vals = [v for v in values if v is not None and np.isfinite(v)]
    if metric in ("projection", "norm_ratio"):  # 1 = right size: diverging around 1
        span = max([abs(v - 1) for v in vals] + [0.05])
        return dict(zmin=1 - span, zmax=1 + span, colorscale="RdBu", zmid=1)
    if metric in ("rel_error", "bias", "bias_floor"):
        return dict(zmin=0, zmax=max(vals + [1e-6]), colorscale="Viridis_r")
    lo = min(vals + [0.0]) if metric == "cosine" else min(vals + [0.5])
    return dict(zmin=min(lo, 0.0) if metric == "cosine" else lo, zmax=1, colorscale="Viridis")


def fidelity_heatmap(result, metric: str = "cosine", title: str | None = None, show_values: bool = True
                     ) -> go.Figure:
    """Layer (rows, input side at the top) x setting (columns) heatmap of one fidelity metric.

    Cells of layers that a setting left unpooled (K narrowed to some stages) are marked '*'.
    """
    d = _plain(result)
    layers, settings = list(d["layers"]), list(d["settings"])
    z = [[d["metrics"][s][metric][i] for s in settings] for i in range(len(layers))]
    comp = d.get("compressed") or {}
    text = [[("" if v is None else f"{v:.2f}") + ("" if comp.get(s, [True] * len(layers))[i] else "*")
             for s, v in zip(settings, row)] for i, row in enumerate(z)]
    label = FIDELITY_METRIC_LABELS.get(metric, metric)
    fig = go.Figure(go.Heatmap(
        z=[[np.nan if v is None else v for v in row] for row in z], x=settings, y=layers,
        text=text, texttemplate="%{text}" if show_values and len(layers) * len(settings) <= 600 else None,
        textfont=dict(size=TICK_SIZE - 4), colorbar=dict(title=dict(text=label, side="right")),
        hovertemplate="%{y}<br>%{x}<br>" + label + " %{z:.4f}<extra></extra>",
        **_fidelity_scale(metric, [v for row in z for v in row])))
    base_layout(fig, title, "setting", "layer (input side at the top)", height=max(450, 140 + 26 * len(layers)))
    fig.update_yaxes(autorange="reversed")
    notes = [f"skipped {s}: {why}" for s, why in (d.get("skipped") or {}).items()]
    if any("*" in t for row in text for t in row):
        notes.append("* = layer not pooled in that setting (K larger than its feature map)")
    if notes:
        fig.add_annotation(text="<br>".join(notes), showarrow=False, xref="paper", yref="paper", x=0, y=-0.12,
                           xanchor="left", yanchor="top", font=dict(size=TICK_SIZE - 2))
    return fig


def fidelity_bars(result, setting: str, metrics: Sequence[str] = ("cosine", "rel_error"),
                  title: str | None = None) -> go.Figure:
    """Per-layer bars of one setting, one bar group per layer and one colour per metric; a dotted
    line at 1 (a perfect cosine, sign agreement or projection)."""
    d = _plain(result)
    if setting not in d["metrics"]:
        raise KeyError(f"setting {setting!r} not in the result ({', '.join(d['settings'])})")
    fig = go.Figure()
    for j, m in enumerate(metrics):
        vals = d["metrics"][setting][m]
        fig.add_trace(go.Bar(x=list(d["layers"]), y=[np.nan if v is None else v for v in vals],
                             name=FIDELITY_METRIC_LABELS.get(m, m), marker_color=PALETTE[j % len(PALETTE)],
                             hovertemplate="%{x}<br>%{y:.4f}<extra>" + m + "</extra>"))
    fig.add_hline(y=1, line=dict(color="gray", dash="dot", width=2))
    labels = [FIDELITY_METRIC_LABELS.get(m, m) for m in metrics]  # unitless: the axis names what is drawn
    base_layout(fig, title or f"{setting}: exact vs compressed weight gradient", None,
                " / ".join(labels) if len(labels) <= 2 else "per-layer fidelity")
    fig.update_layout(barmode="group")
    fig.update_xaxes(tickangle=-45)
    rel_x = (d.get("input_rel_error") or {}).get(setting)
    if rel_x is not None:  # a note above the plot, the legend below: both at the top ran into each other
        _note_above(fig, f"input-gradient relative error {rel_x:.1e}")
    # below the tilted layer names (about 100 px at 45 degrees)
    return _legend_below(fig, n_entries=1, height=480, gap=110)


def _history_mean(h: Mapping, metric: str) -> list:
    table = h[metric]
    out = []
    for i in range(len(h["steps"])):
        vals = [table[n][i] for n in h["layers"] if table[n][i] is not None]
        out.append(sum(vals) / len(vals) if vals else None)
    return out


def fidelity_over_training_figure(history, metric: str = "cosine", layers: Sequence[str] | None = None,
                                  colors: Mapping[str, str] | None = None, title: str | None = None) -> go.Figure:
    """Fidelity records of training (core.analysis.fidelity_history.fidelity_over_training) against the step.

    One history: one faint line per layer (shaded from input side to output side) and the mean
    over layers, bold. A mapping run name -> history: the layer mean of each run, in its colour.
    """
    fig = go.Figure()
    label = FIDELITY_METRIC_LABELS.get(metric, metric)
    if isinstance(history, Mapping) and "steps" not in history:
        runs = {name: _plain(h) for name, h in history.items()}
        cmap = _colors(list(runs), colors)
        for name, h in runs.items():
            mean = _history_mean(h, metric)
            fig.add_trace(go.Scatter(x=h["steps"], y=mean, mode="lines+markers", name=name,
                                     line=dict(color=cmap[name], width=3), marker=dict(size=7)))
        base_layout(fig, title, "step", f"{label} (mean over layers)")
        _legend_below(fig)
        return fig
    h = _plain(history)
    names = [n for n in h["layers"] if layers is None or n in layers]
    for i, n in enumerate(names):
        shade = int(40 + 170 * i / max(1, len(names) - 1))
        fig.add_trace(go.Scatter(x=h["steps"], y=h[metric][n], mode="lines", name=n, opacity=0.6,
                                 line=dict(width=1.5, color=f"rgb({shade},{shade // 2},{255 - shade})")))
    fig.add_trace(go.Scatter(x=h["steps"], y=_history_mean(h, metric), mode="lines+markers", name="mean",
                             line=dict(color="black", width=4), marker=dict(size=7)))
    base_layout(fig, title, "step", label)
    if not h["steps"]:
        fig.add_annotation(text="no fidelity records yet", showarrow=False, xref="paper", yref="paper", x=0.5,
                           y=0.5, font=dict(size=FONT_SIZE))
    return fig
