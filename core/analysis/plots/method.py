"""The method in one picture: an activation, its pooled copy and what backward rebuilds."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ...method.meter import format_bytes
from .common import TICK_SIZE, _hide_axes, _to_uint8, base_layout


def method_figure(image, activation, pooled, restored, k: int, pool: str = "avg", layer: str = "",
                  channel: int = 0, sizes: Mapping[str, int | None] | None = None, title: str | None = None
                  ) -> go.Figure:
    """The method in one picture, two by two: the input image and one channel of a conv's input
    as the forward pass uses it (exact); below, the K x K pooled copy kept for backward and what
    backward rebuilds from it (nearest upsampling). The three maps share one colour scale; panel
    titles carry the bytes each takes (`sizes`: {"full", "pooled", "mask"} per image, all
    channels). Two by two rather than four in a row: at a projector's 1024 px each picture
    stays over 96 px wide and the titles do not run into each other."""
    sizes = dict(sizes or {})
    act, pooled, restored = (np.asarray(a, dtype=np.float64) for a in (activation, pooled, restored))
    full_b, pool_b, mask_b = sizes.get("full"), sizes.get("pooled"), sizes.get("mask")
    heads = ["input image",
             "forward pass uses" + (f"<br>{format_bytes(full_b)}" if full_b else ""),
             f"kept for backward<br>({pool} pool {k}×{k})" + (f"<br>{format_bytes(pool_b)}" if pool_b else "")
             + (f" + mask {format_bytes(mask_b)}" if mask_b else ""),
             "backward pass gets back" + ("<br>(upsampled)" if k > 1 else "<br>(the same: K=1)")]
    lines = [h.count("<br>") + 1 for h in heads]
    head_px = [22 * n + 8 for n in lines]
    head = title if title is not None else (f"{layer}, channel {channel}" if layer else None)
    top = (70 if head else 10) + max(head_px[:2])
    height = top + 2 * 230 + max(head_px[2:]) + 20
    fig = make_subplots(rows=2, cols=2, subplot_titles=heads, horizontal_spacing=0.08,
                        vertical_spacing=max(head_px[2:]) / (height - top - 20))
    fig.add_trace(go.Image(z=_to_uint8(image), hoverinfo="skip", name="input"), row=1, col=1)
    lo = float(min(act.min(), restored.min()))
    hi = float(max(act.max(), restored.max()))
    for (row, col), z, name in (((1, 2), act, "forward"), ((2, 1), pooled, "kept"), ((2, 2), restored, "backward")):
        fig.add_trace(go.Heatmap(z=z, coloraxis="coloraxis", name=name,
                                 hovertemplate=name + " (%{y}, %{x}): %{z:.3f}<extra></extra>"), row=row, col=col)
        fig.update_yaxes(autorange="reversed", row=row, col=col)
    fig.update_layout(coloraxis=dict(colorscale="Viridis", cmin=lo, cmax=hi if hi > lo else lo + 1,
                                     colorbar=dict(title=dict(text="activation"), tickfont=dict(size=TICK_SIZE))))
    _hide_axes(fig)
    base_layout(fig, head, height=height)
    fig.update_layout(margin=dict(l=10, r=10, t=top, b=20))
    for ann in fig.layout.annotations:
        ann.font = dict(size=TICK_SIZE)
    return fig
