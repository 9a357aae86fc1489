"""Memory: the ladder, the planner, bytes per image, memory of runs while training."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go

from ...method.meter import format_bytes
from .. import curves
from .common import FONT_SIZE, PALETTE, TICK_SIZE, _colors, _legend_below, _note_above, _plain, base_layout

KIND_COLORS = {"conv input": "#1F77B4", "BN input": "#FF7F0E", "ReLU state": "#2CA02C", "linear input": "#9467BD",
               "checkpoint input": "#8C564B", "other": "#7F7F7F"}


def memory_ladder_figure(ladder, title: str | None = None) -> go.Figure:
    """Saved activations per policy as bars stacked by kind (conv input, BN input, ReLU state,
    checkpoint input, ...), the total and the cut vs "none" on top, and the measured step-time
    ratio when the ladder was timed."""
    d = _plain(ladder)
    steps = d["steps"]
    policies = [s["policy"] for s in steps]
    kinds = [k for k in KIND_COLORS if any(s["by_kind"].get(k) for s in steps)]
    kinds += sorted({k for s in steps for k in s["by_kind"]} - set(kinds))
    fig = go.Figure()
    for k in kinds:
        fig.add_trace(go.Bar(x=policies, y=[s["by_kind"].get(k, 0) / 2 ** 20 for s in steps], name=k,
                             marker_color=KIND_COLORS.get(k, "#BCBD22"),
                             hovertemplate="%{x}<br>" + k + " %{y:.1f} MiB<extra></extra>"))
    top = []
    for s in steps:
        t = f"{s['total_bytes'] / 2 ** 20:.1f} MiB"
        if s.get("cut") is not None and s["policy"] != "none":
            t += f"<br>{-100 * s['cut']:+.0f}%"
        if s.get("time_ratio") is not None:
            t += f"<br>×{s['time_ratio']:.2f} time"
        top.append(t)
    fig.add_trace(go.Scatter(x=policies, y=[s["total_bytes"] / 2 ** 20 for s in steps], mode="text", text=top,
                             textposition="top center", textfont=dict(size=TICK_SIZE), showlegend=False,
                             hoverinfo="skip", name="total"))
    model = d.get("model", "")
    base_layout(fig, title or f"Saved activations, {model}, batch {d.get('batch')}", "policy",
                "saved activations (MiB)")
    fig.update_layout(barmode="stack", legend=dict(orientation="h", y=1.02, yanchor="bottom", x=0))
    ymax = max([s["total_bytes"] for s in steps] + [1]) / 2 ** 20
    fig.update_yaxes(range=[0, ymax * 1.3])
    return fig


def _plan_line(p: Mapping) -> tuple[float, float]:
    """(a, b) with predicted peak bytes = a + b * batch, from a MemoryPlan dict."""
    if p.get("peak_fit"):
        a, b = p["peak_fit"]
        return float(a), float(b)
    a, b = p["saved_fit"]
    return float(a) + float(p["model_state"]["total"]), float(b)


def planner_measure(plans) -> str:
    """What planner_figure's "predicted GiB" is, for the page's caption."""
    plans = [_plain(p) for p in plans]
    if plans and plans[0].get("peak_fit"):
        batches = plans[0].get("peak_fit_batches") or []
        return "CUDA max_memory_allocated, fitted over batches " + ", ".join(map(str, batches))
    return "model state + saved activations (a lower bound of the peak)"


def planner_figure(plans, budget: float, max_batch: int | None = None, colors: Mapping[str, str] | None = None,
                   title: str | None = None) -> go.Figure:
    """Predicted peak training memory (GiB) against the batch size, one line per plan (policy),
    the budget (bytes) as a horizontal line and each policy's largest fitting batch marked."""
    plans = [_plain(p) for p in plans]
    names = [p["policy"] for p in plans]
    cmap = _colors(names, colors)
    lines = [_plan_line(p) for p in plans]
    largest = [max(0, int((budget - a) // b)) if b > 0 else None for a, b in lines]
    top = max_batch or int(max([n for n in largest if n] + [64]) * 1.25)
    xs = np.linspace(1, top, 200)
    fig = go.Figure()
    # label the largest batches in batch order, alternately above-left and below-right of their
    # diamonds: neighbours (e.g. 5622 and 5649) then sit on opposite sides of the budget line
    order = sorted((n, k) for k, n in enumerate(largest) if n)
    side = {k: ("top left" if j % 2 == 0 else "bottom right") for j, (n, k) in enumerate(order)}
    for k, (p, (a, b), n) in enumerate(zip(plans, lines, largest)):
        c = cmap[p["policy"]]
        fig.add_trace(go.Scatter(x=xs, y=(a + b * xs) / 2 ** 30, mode="lines", name=p["policy"],
                                 line=dict(color=c, width=3), legendgroup=p["policy"],
                                 hovertemplate="batch %{x:.0f}<br>%{y:.2f} GiB<extra>" + p["policy"] + "</extra>"))
        if n:
            fig.add_trace(go.Scatter(x=[n], y=[(a + b * n) / 2 ** 30], mode="markers+text", text=[str(n)],
                                     textposition=side[k], textfont=dict(size=TICK_SIZE - 2, color=c),
                                     cliponaxis=False,
                                     marker=dict(color=c, size=14, symbol="diamond",
                                                 line=dict(color="black", width=1)),
                                     name=f"{p['policy']}: largest batch {n}", legendgroup=p["policy"],
                                     showlegend=False,
                                     hovertemplate=f"{p['policy']}: largest batch {n}"
                                                   "<br>%{y:.2f} GiB<extra></extra>"))
    # the budget's label above the line at whichever end the diamonds leave free: the left end,
    # unless a diamond sits near it (then the right end: the x axis runs on 25 % past the largest)
    near_left = bool(order) and order[0][0] < 0.2 * top
    fig.add_hline(y=budget / 2 ** 30, line=dict(color="black", dash="dash", width=2),
                  annotation_text=f"budget {budget / 2 ** 30:.1f} GiB",
                  annotation_position="top right" if near_left else "top left",
                  annotation_font_size=TICK_SIZE - 2, annotation_yshift=4)
    model = plans[0].get("model", "") if plans else ""
    # the axis title stays short; what "predicted" means (CUDA peak fitted, or model state +
    # saved activations as a lower bound) is for the caption, see `planner_measure`
    base_layout(fig, title or f"Predicted training memory, {model}", "batch size", "predicted GiB")
    fig.update_layout(legend=dict(orientation="h", x=0, xanchor="left", y=1.0, yanchor="bottom"),
                      margin=dict(t=120))
    return fig


def bytes_bars(items: Mapping[str, float | None], title: str | None = None, x_title: str = "bytes per image"
               ) -> go.Figure:
    """Horizontal bars of sizes in bytes (e.g. full tensor vs pooled copy vs ReLU mask), each
    labelled with its size; items with None are left out."""
    names = [n for n, v in items.items() if v is not None]
    vals = [float(items[n]) for n in names]
    unit, div = ("MiB", 2 ** 20) if max(vals + [0]) >= 2 ** 20 else ("KiB", 2 ** 10)
    fig = go.Figure(go.Bar(x=[v / div for v in vals], y=names, orientation="h", text=[format_bytes(v) for v in vals],
                           textposition="auto", textfont=dict(size=FONT_SIZE),
                           marker_color=[PALETTE[i % len(PALETTE)] for i in range(len(names))],
                           hovertemplate="%{y}: %{text}<extra></extra>"))
    base_layout(fig, title, f"{x_title} ({unit})", None, height=140 + 60 * len(names))
    fig.update_yaxes(autorange="reversed")
    return fig


def run_memory_bars(rows: Sequence[Mapping], colors: Mapping[str, str] | None = None, title: str | None = None
                    ) -> go.Figure:
    """Recorded memory of runs: saved activations (in the run's colour) with model state stacked
    on top (grey). rows: {"name", "saved_bytes", "state_bytes", "batch"}."""
    names = [r["name"] for r in rows]
    cmap = _colors(names, colors)
    fig = go.Figure()
    fig.add_trace(go.Bar(x=names, y=[(r.get("saved_bytes") or 0) / 2 ** 20 for r in rows], name="saved activations",
                         marker_color=[cmap[n] for n in names],
                         text=[f"batch {r.get('batch')}" if r.get("batch") else "" for r in rows],
                         textposition="inside", textfont=dict(size=TICK_SIZE),
                         hovertemplate="%{x}<br>saved activations %{y:.1f} MiB<extra></extra>"))
    fig.add_trace(go.Bar(x=names, y=[(r.get("state_bytes") or 0) / 2 ** 20 for r in rows],
                         name="model state (params, grads, optimiser)", marker_color="#B0B0B0",
                         hovertemplate="%{x}<br>model state %{y:.1f} MiB<extra></extra>"))
    base_layout(fig, title, None, "MiB", height=480)
    fig.update_layout(barmode="stack", legend=dict(orientation="h", y=1.0, yanchor="bottom", x=0),
                      margin=dict(t=130 if title else 70))
    return fig


def cuda_memory_curves(runs_metrics: Mapping[str, Sequence[Mapping]], key: str = "cuda_peak",
                       max_points: int = curves.MAX_POINTS, colors: Mapping[str, str] | None = None,
                       title: str | None = None) -> go.Figure:
    """CUDA memory recorded during training (`cuda_peak`: max_memory_allocated so far, or
    `cuda_allocated`) against the step, one line per run; runs without it are named below."""
    cmap = _colors(list(runs_metrics), colors)
    fig = go.Figure()
    missing = []
    for name, records in runs_metrics.items():
        pts = [(r["step"], r[key]) for r in records if r.get("type") == "step" and isinstance(r.get(key), (int, float))
               and isinstance(r.get("step"), (int, float))]
        if not pts:
            missing.append(name)
            continue
        xs, ys = curves.downsample(np.array([p[0] for p in pts], dtype=np.float64),
                                   np.array([p[1] for p in pts], dtype=np.float64) / 2 ** 30, max_points)
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", name=name, line=dict(color=cmap[name], width=3)))
    label = {"cuda_peak": "CUDA peak (max_memory_allocated)", "cuda_allocated": "CUDA allocated"}.get(key, key)
    base_layout(fig, title, "step", f"{label} (GiB)")
    if missing:
        _note_above(fig, f"no CUDA records (trained on the CPU): {', '.join(missing)}", 60,
                    lines=1 + len(missing) // 3)
    _legend_below(fig, n_entries=len(runs_metrics) - len(missing))
    return fig
