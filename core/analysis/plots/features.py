"""Filters, filter spectra, CKA between layers, activation images."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .common import (
    FONT_SIZE,
    TICK_SIZE,
    _colors,
    _hide_axes,
    _legend_below,
    _matrix_heatmap,
    _to_uint8,
    base_layout,
    wrap_lines,
)

PANEL = 300  # px of height per row of filter mosaics


def filter_grid_figure(images: Mapping[str, np.ndarray], title: str | None = None, cols: int | None = None,
                       colors: Mapping[str, str] | None = None) -> go.Figure:
    """Filter mosaics (from features.filter_grid / channel_grid), one per run, at most two a row
    (`cols` by default) so that each stays large and its title, the run name in its colour,
    wrapped, has room at projector widths."""
    names = list(images)
    cmap = _colors(names, colors)
    cols = max(1, min(cols or 2, len(names)))
    rows = -(-len(names) // cols)
    heads = [wrap_lines(n, 26 if cols > 1 else 52) for n in names]
    head_px = 26 * max(h.count("<br>") + 1 for h in heads) + 30  # a title nearer its own grid than the one above
    top = (80 if title else 20) + head_px
    height = top + 30 + rows * PANEL + (rows - 1) * head_px
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=heads, horizontal_spacing=0.06,
                        vertical_spacing=head_px / max(1, height - top - 30) if rows > 1 else 0.0)
    for i, name in enumerate(names):
        fig.add_trace(go.Image(z=_to_uint8(images[name]), name=name, hoverinfo="skip"),
                      row=i // cols + 1, col=i % cols + 1)
    _hide_axes(fig)
    base_layout(fig, title, height=height)
    fig.update_layout(margin=dict(t=top, b=30))
    for ann, name in zip(fig.layout.annotations, names):
        ann.font = dict(size=FONT_SIZE, color=cmap[name])
    return fig


def _pick_spectrum(value, layer: str | None):
    if isinstance(value, Mapping):
        return value
    for entry in value:
        if layer is None or entry["name"] == layer:
            return entry
    raise KeyError(f"no spectrum for layer {layer!r}")


def spectra_figure(spectra_by_run: Mapping[str, Mapping | Sequence[Mapping]], layer: str | None = None,
                   log_y: bool = True, y_title: str = "share of filter energy", colors: Mapping[str, str] | None = None,
                   title: str | None = None) -> go.Figure:
    """Filter spectra over radial frequency, one line per run (by default each ring's share of the
    energy: filters.radial_power_spectrum, normalize).

    spectra_by_run: name -> {"freqs", "power"} or name -> features.layer_spectra(...) list
    (then `layer` picks the entry; None = the first). Dotted lines mark half Nyquist
    (0.25 cycles/pixel, the high-frequency cut) and Nyquist (0.5).
    """
    names = list(spectra_by_run)
    cmap = _colors(names, colors)
    fig = go.Figure()
    for name in names:
        s = _pick_spectrum(spectra_by_run[name], layer)
        fig.add_trace(go.Scatter(x=np.asarray(s["freqs"]), y=np.asarray(s["power"]), mode="lines+markers", name=name,
                                 line=dict(color=cmap[name], width=3), marker=dict(color=cmap[name], size=7)))
    for f, label in ((0.25, "½ Nyquist"), (0.5, "Nyquist")):
        fig.add_vline(x=f, line=dict(color="gray", dash="dot"), annotation_text=label,
                      annotation_font_size=TICK_SIZE, annotation_position="top")
    base_layout(fig, title, "spatial frequency (cycles/pixel)", y_title)
    _legend_below(fig)
    if log_y:  # labels at the powers of ten only: plotly's own minor labels ("2", "5") read as values
        fig.update_yaxes(type="log", dtick=1, exponentformat="power", showexponent="all")
    return fig


def hf_share_bars(spectra_by_run: Mapping[str, Sequence[Mapping]], colors: Mapping[str, str] | None = None,
                  title: str | None = None) -> go.Figure:
    """Per layer, the share of filter energy above half Nyquist; grouped bars, one colour per run.
    spectra_by_run: name -> features.layer_spectra(...) (entries with "name", "hf_share")."""
    names = list(spectra_by_run)
    cmap = _colors(names, colors)
    fig = go.Figure()
    for name in names:
        entries = spectra_by_run[name]
        fig.add_trace(go.Bar(x=[e["name"] for e in entries], y=[e["hf_share"] for e in entries], name=name,
                             marker_color=cmap[name]))
    base_layout(fig, title, None, "energy above ½ Nyquist")
    fig.update_layout(barmode="group")
    fig.update_yaxes(tickformat=".0%")
    fig.update_xaxes(tickangle=-45)
    # the legend under the tilted layer names: beside the plot it took half of a projector's width
    return _legend_below(fig, height=480, gap=110)


def cka_heatmap(names_a: Sequence[str], names_b: Sequence[str], matrix, title: str | None = None,
                label_a: str = "model A", label_b: str = "model B") -> go.Figure:
    """Linear CKA between layers of two models (rows: A's layers, top = first; columns: B's)."""
    fig = go.Figure()
    _matrix_heatmap(fig, matrix, names_b, names_a, 0.0, 1.0, "Viridis", "CKA")
    base_layout(fig, title, f"{label_b} layer", f"{label_a} layer",
                height=max(450, 120 + 42 * len(names_a)))
    return fig


def activation_images_figure(images, titles: Sequence[str] | None = None, cols: int = 8,
                             title: str | None = None) -> go.Figure:
    """A grid of images (features.maximize_activations output (n, H, W, 3), a list, or a
    dict label -> image), titled e.g. "ch 3"."""
    if isinstance(images, Mapping):
        titles = list(images) if titles is None else titles
        images = list(images.values())
    images = list(images)
    titles = [f"ch {i}" for i in range(len(images))] if titles is None else list(titles)
    cols = max(1, min(cols, len(images)))
    rows = -(-len(images) // cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=titles, horizontal_spacing=0.01,
                        vertical_spacing=0.2 / max(rows, 1))
    for i, img in enumerate(images):
        fig.add_trace(go.Image(z=_to_uint8(img), name=titles[i], hoverinfo="skip"), row=i // cols + 1,
                      col=i % cols + 1)
    _hide_axes(fig)
    base_layout(fig, title, height=120 + 190 * rows)
    for ann in fig.layout.annotations:
        ann.font = dict(size=TICK_SIZE)
    return fig
