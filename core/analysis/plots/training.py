"""Training curves, time-to-accuracy and per-class bars, and the accuracy-vs-memory plot."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go

from .. import curves
from .common import TICK_SIZE, _colors, _legend_below, _note_above, _wrap, base_layout

X_TITLES = {"step": "step", "epoch": "epoch", "wall": "wall time (s)"}


Y_TITLES = {"train_loss": "training loss", "train_acc": "training accuracy", "val_loss": "validation loss",
            "val_acc": "validation accuracy", "lr": "learning rate", "step_time": "time per step (s)"}


def loss_curves(runs_metrics: Mapping[str, Sequence[Mapping]], y: str = "train_loss", x: str = "step",
                smoothing: float = 0.0, log_y: bool = False, show_raw: bool = False,
                max_points: int = curves.MAX_POINTS, colors: Mapping[str, str] | None = None,
                title: str | None = None) -> go.Figure:
    """One line per run from its metrics.jsonl records (see core.analysis.curves for the fields).

    smoothing: EMA weight 0..0.99 (debiased); show_raw adds the unsmoothed line, faint.
    Runs without any value for `y` get no line, and a note under the plot names them.
    """
    cmap = _colors(list(runs_metrics), colors)
    kind = curves.Y_SOURCES.get(y, ("step", ""))[0]
    fig = go.Figure()
    missing = []
    for name, records in runs_metrics.items():
        xs, ys = curves.series(records, y, x)
        if len(xs) == 0:
            missing.append(name)
            continue
        color = cmap[name]
        if show_raw and smoothing > 0:
            rx, ry = curves.downsample(xs, ys, max_points)
            fig.add_trace(go.Scatter(x=rx, y=ry, mode="lines", name=f"{name} (raw)", legendgroup=name,
                                     showlegend=False, opacity=0.25, line=dict(color=color, width=1),
                                     hoverinfo="skip"))
        sx, sy = curves.downsample(xs, curves.ema(ys, smoothing), max_points)
        mode = "lines+markers" if kind == "eval" else "lines"
        fig.add_trace(go.Scatter(x=sx, y=sy, mode=mode, name=name, legendgroup=name,
                                 line=dict(color=color, width=3), marker=dict(color=color, size=8)))
    y_title = Y_TITLES.get(y, y) + (f" (EMA {smoothing:g})" if smoothing > 0 else "")
    base_layout(fig, title, X_TITLES.get(x, x), y_title)
    if log_y:
        fig.update_yaxes(type="log")
    if y.endswith("acc") and all(np.nanmax(t.y, initial=0) <= 1 for t in fig.data):
        fig.update_yaxes(tickformat=".0%")  # fractions, as the trainer writes them
    if missing:
        _note_above(fig, f"no {Y_TITLES.get(y, y)} yet: {', '.join(missing)}", 45, lines=1 + len(missing) // 2)
    _legend_below(fig, n_entries=len(runs_metrics) - len(missing))
    return fig


def time_to_accuracy_bars(rows: Sequence[Mapping], threshold: float, by: str = "epochs",
                          colors: Mapping[str, str] | None = None, title: str | None = None) -> go.Figure:
    """Bars of epochs (by="epochs") or wall seconds (by="wall") to first reach `threshold`,
    from `curves.epochs_to_accuracy_table` rows; runs that never reached it are listed."""
    key = f"{'epochs' if by == 'epochs' else 'wall'}_to_{threshold:g}"
    names = [r["run"] for r in rows]
    cmap = _colors(names, colors)
    fig = go.Figure()
    never = []
    for r in rows:
        if r.get(key) is None:
            never.append(r["run"])
            continue
        fig.add_trace(go.Bar(x=[r["run"]], y=[r[key]], name=r["run"], marker_color=cmap[r["run"]]))
    base_layout(fig, title, "run", "epochs" if by == "epochs" else "wall time (s)")
    fig.update_layout(showlegend=False)
    if never:  # one run per line: the figure may be narrow (a column of the page)
        lines = [f"never reached {threshold:.0%}:" if threshold <= 1 else f"never reached {threshold:g}:"]
        lines += [_wrap(n, 28) for n in never]
        text = "<br>".join(lines)
        n_lines = text.count("<br>") + 1
        fig.add_annotation(text=text, showarrow=False, xref="paper", yref="paper", x=0, y=1.01, xanchor="left",
                           yanchor="bottom", align="left", font=dict(size=TICK_SIZE - 2))
        fig.update_layout(margin=dict(t=(fig.layout.margin.t or 40) + 20 * n_lines))
    # run names on the x axis wrapped (not rotated), the narrower the more bars: the figure may
    # be a narrow column (about 36 characters of tick text across)
    shown = [n for n in names if n not in never]
    ticks = [_wrap(n, max(6, min(14, 36 // max(1, len(shown))))) for n in shown]
    fig.update_xaxes(tickvals=shown, ticktext=ticks, tickangle=0, title_text=None)
    fig.update_layout(margin=dict(b=30 + 20 * max([t.count("<br>") + 1 for t in ticks] + [1])))
    return fig


def per_class_bars(classes: Sequence[str], accs_by_run: Mapping[str, Sequence[float | None]],
                   reference: str | None = None, colors: Mapping[str, str] | None = None,
                   title: str | None = None) -> go.Figure:
    """Grouped bars, one group per class and one bar per run: validation accuracy in %, or with
    `reference` (one of the runs) each other run's difference to it in percentage points, which
    shows at a glance which classes a setting costs."""
    names = [n for n in accs_by_run if n != reference]
    cmap = _colors(list(accs_by_run), colors)
    ref = accs_by_run[reference] if reference else None
    hover = "%{x}: %{y:+.1f} points" if ref is not None else "%{x}: %{y:.1f} %"
    fig = go.Figure()
    for n in names:
        ys = [None if a is None else 100 * a for a in accs_by_run[n]]
        if ref is not None:
            ys = [None if y is None or r is None else y - 100 * r for y, r in zip(ys, ref)]
        fig.add_trace(go.Bar(x=list(classes), y=ys, name=n, marker_color=cmap[n],
                             hovertemplate=hover + "<extra>" + n + "</extra>"))
    base_layout(fig, title, None, "change (points)" if reference else "validation accuracy (%)")
    fig.update_layout(barmode="group", bargap=0.2)
    if ref is None:
        fig.update_yaxes(range=[0, 100])
    else:
        fig.add_hline(y=0, line_color="#444", line_width=1)
    return _legend_below(fig, n_entries=len(names))


def pareto_scatter(rows: Sequence[Mapping], memory_label: str = "saved activations",
                   colors: Mapping[str, str] | None = None, title: str | None = None) -> go.Figure:
    """Accuracy against memory, one marker per run; the Pareto front (less memory, more
    accuracy) as a dashed staircase, its runs drawn as diamonds.

    rows: {"name", "policy", "acc", "memory" (bytes)}. `memory_label` says which memory
    it is (docs/fidelity_and_memory.md): "saved activations", "CUDA peak", ...
    """
    names = [r["name"] for r in rows]
    cmap = _colors(names, colors)
    front = curves.pareto_front([(r.get("memory"), r.get("acc")) for r in rows])
    # one policy label per policy, above its most accurate run: runs of one policy share their
    # memory, so a second label would sit on the first (the legend names every run)
    best_of_policy: dict[str, int] = {}
    for i, r in enumerate(rows):
        if r.get("memory") is not None and r.get("acc") is not None:
            pol = str(r.get("policy", ""))
            if pol not in best_of_policy or r["acc"] > rows[best_of_policy[pol]]["acc"]:
                best_of_policy[pol] = i
    # policies of equal bytes (avg2, max2, avg2-lowres) share a column, often a point apart: its
    # most accurate label sits above its marker, its least accurate below, any between to the
    # right (to the left a label runs into the neighbouring column's), so labels do not overlap
    columns: dict[float, list[int]] = {}
    for i in best_of_policy.values():
        columns.setdefault(rows[i]["memory"], []).append(i)
    position: dict[int, str] = {}
    for labelled in columns.values():
        ordered = sorted(labelled, key=lambda j: -rows[j]["acc"])
        for rank, i in enumerate(ordered):
            position[i] = "top center" if rank == 0 else "bottom center" if rank == len(ordered) - 1 else "middle right"
    fig = go.Figure()
    for i, r in enumerate(rows):
        if r.get("memory") is None or r.get("acc") is None:
            continue
        on = i in front
        fig.add_trace(go.Scatter(
            x=[r["memory"] / 2 ** 20], y=[r["acc"]], mode="markers+text", name=r["name"],
            text=[str(r.get("policy", "")) if i in position else ""],
            textposition=position.get(i, "top center"),
            textfont=dict(size=TICK_SIZE),
            cliponaxis=False,
            marker=dict(color=cmap[r["name"]], size=20 if on else 14, symbol="diamond" if on else "circle",
                        line=dict(color="black", width=1.5 if on else 0)),
            hovertemplate=f"{r['name']}<br>policy {r.get('policy', '')}<br>%{{x:.1f}} MiB<br>%{{y}}<extra></extra>"))
    if len(front) > 1:
        fig.add_trace(go.Scatter(x=[rows[i]["memory"] / 2 ** 20 for i in front], y=[rows[i]["acc"] for i in front],
                                 mode="lines", name="Pareto front", line=dict(color="gray", dash="dash", width=2),
                                 line_shape="hv", hoverinfo="skip"))
    base_layout(fig, title, f"{memory_label} (MiB)", "accuracy")
    # legend under the plot: beside it, a dozen long run names take half the width and squeeze
    # the labelled markers together; a full-width figure fits two or more names per legend row
    _legend_below(fig, n_entries=-(-len(fig.data) // 2), height=520)  # taller: labels between markers
    accs = [r["acc"] for r in rows if r.get("acc") is not None]
    if accs and max(accs) <= 1:
        fig.update_yaxes(tickformat=".0%")
    # room for the labels (centred above each marker) inside the axes: pad x by a share of the span
    xs = [r["memory"] / 2 ** 20 for r in rows if r.get("memory") is not None and r.get("acc") is not None]
    ys = [r["acc"] for r in rows if r.get("memory") is not None and r.get("acc") is not None]
    if xs:
        span = (max(xs) - min(xs)) or max(abs(max(xs)), 1.0)
        fig.update_xaxes(range=[min(xs) - 0.18 * span, max(xs) + 0.18 * span])
        yspan = (max(ys) - min(ys)) or max(abs(max(ys)) * 0.1, 0.01)
        fig.update_yaxes(range=[min(ys) - 0.12 * yspan, max(ys) + 0.25 * yspan])
    return fig
