"""Attribution maps and the agreement between models."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .common import TICK_SIZE, _colors, _hide_axes, _matrix_heatmap, _numpy, _to_uint8, _wrap, base_layout, colorscale


def _class_label(classes: Sequence[str] | None, c) -> str:
    c = int(c)
    return classes[c] if classes is not None and 0 <= c < len(classes) else str(c)


def attribution_grid(images, attributions_by_model: Mapping[str, object], predictions: Mapping | None = None,
                     classes: Sequence[str] | None = None, targets=None, title: str | None = None,
                     colors: Mapping[str, str] | None = None,
                     model_classes: Mapping[str, Sequence[str]] | None = None,
                     target_label: str = "target", tile_px: int | None = None) -> go.Figure:
    """Images (rows) x models (columns): the input, then each model's attribution map.

    images: (B, H, W, 3) in [0, 1] (features.denormalize); attributions_by_model: name ->
    (B, H, W); predictions: name -> {"class", "confidence"} as from compare_models. Each
    map is scaled by its own max |value| for display: a diverging red/blue scale when any
    map is signed, else a sequential one. Column headers carry each model's colour.
    Names: `classes` name the targets (the images' labels); a model's prediction is named
    with its own classes, `model_classes[name]` (default `classes`), so that a CIFAR-10 model
    looking at the built-in images still says "cat", never a built-in class. `target_label` heads
    the class each row explains: "target" for the images' own labels; the app says "explained:"
    where it explains the first run's guess (a label over a noise texture read as the truth).
    `tile_px`: the rows' height in px (default: what fits the narrowest figure, at 1024 px); a
    wide screen's figure has room for larger pictures.
    """
    imgs = np.asarray(images)
    names = list(attributions_by_model)
    cmap = _colors(names, colors)
    maps = {n: np.asarray(_numpy(attributions_by_model[n]), dtype=np.float64) for n in names}
    n_img = imgs.shape[0]
    signed = any((m < 0).any() for m in maps.values())
    cols = 1 + len(names)
    subtitles, title_colors = [], []  # colour per subplot title (None: the default)
    for i in range(n_img):
        tgt = f"{target_label}<br>{_class_label(classes, _numpy(targets)[i])}" if targets is not None else ""
        subtitles.append(("input<br>" if i == 0 else "") + tgt)
        title_colors.append(None)
        for n in names:
            pred = ""
            if predictions is not None and n in predictions:
                p = predictions[n]
                own = (model_classes or {}).get(n, classes)
                # the class and its confidence on two lines: a column can be ~90 px wide at 1024 px
                pred = f"{_class_label(own, _numpy(p['class'])[i])}<br>{float(_numpy(p['confidence'])[i]):.0%}"
            # long run names wrap (at " · ", then at ~12 characters) so that columns' titles do not collide
            subtitles.append((f"{_wrap(n, 12)}<br>" if i == 0 else "") + pred)
            title_colors.append(cmap[n] if i == 0 else None)
    head_lines = max(t.count("<br>") + 1 for t in subtitles[:cols]) if subtitles else 1
    row_lines = max([t.count("<br>") + 1 for t in subtitles[cols:]] + [1])
    title_font = TICK_SIZE - 2
    row_px = int(1.3 * title_font * row_lines) + 8  # room above each later row for its titles
    top = (70 if title else 20) + int(1.3 * title_font * head_lines)  # the figure title clears the column titles
    # a row as tall as its pictures are wide in the narrowest figure (about 440 px of plot at 1024 px):
    # taller rows would leave the pictures floating under their titles there
    row_h = int(tile_px) if tile_px else int(min(200, max(90, 440 / cols)))
    height = top + 60 + row_h * n_img + row_px * (n_img - 1)
    fig = make_subplots(rows=n_img, cols=cols, subplot_titles=subtitles, horizontal_spacing=0.02,
                        vertical_spacing=row_px / (height - top - 60) if n_img > 1 else 0.0)
    for i in range(n_img):
        fig.add_trace(go.Image(z=_to_uint8(imgs[i]), name="input", hoverinfo="skip"), row=i + 1, col=1)
        for j, n in enumerate(names):
            m = maps[n][i]
            scale = np.abs(m).max()
            fig.add_trace(go.Heatmap(z=m / scale if scale > 0 else m, coloraxis="coloraxis", name=n,
                                     hovertemplate=f"{n}: %{{z:.2f}}<extra></extra>"), row=i + 1, col=j + 2)
            fig.update_yaxes(autorange="reversed", row=i + 1, col=j + 2)
    fig.update_layout(coloraxis=dict(colorscale="RdBu_r" if signed else colorscale("Inferno"),
                                     cmin=-1 if signed else 0, cmax=1,
                                     colorbar=dict(title=dict(text="relative<br>attribution"))))
    _hide_axes(fig)
    base_layout(fig, title, height=height)
    fig.update_layout(margin=dict(t=top))
    # make_subplots leaves out empty titles: pair the annotations with the non-empty ones
    for ann, color in zip(fig.layout.annotations, [c for t, c in zip(subtitles, title_colors) if t]):
        ann.font = dict(size=title_font, color=color) if color else dict(size=title_font)
    return fig


def agreement_heatmap(names: Sequence[str], matrix, metric: str = "spearman", title: str | None = None) -> go.Figure:
    """Mean agreement between models' attribution maps (attribution.agreement_matrix):
    Spearman rank correlation (-1..1) or top-k% IoU (0..1)."""
    fig = go.Figure()
    label = {"spearman": "Spearman ρ", "topk_iou": "top-k IoU"}.get(metric, metric)
    zmin = -1.0 if metric == "spearman" else 0.0
    _matrix_heatmap(fig, matrix, names, names, zmin, 1.0, "RdBu_r" if zmin < 0 else "Viridis", label)
    base_layout(fig, title, "model", "model", height=max(400, 150 + 60 * len(names)))
    return fig
