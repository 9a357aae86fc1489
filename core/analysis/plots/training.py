"""Training curves, epochs to an accuracy and per-class bars; runs of one setting (seeds) as
their mean with a min-max band."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go

from .. import curves
from ..run_groups import band
from .common import TICK_SIZE, _colors, _legend_below, _note_above, base_layout, rgba, wrap_lines

X_TITLES = {"step": "step", "epoch": "epoch", "wall": "wall time (s)"}


Y_TITLES = {"train_loss": "training loss", "train_acc": "training accuracy", "val_loss": "validation loss",
            "val_acc": "validation accuracy", "lr": "learning rate", "step_time": "time per step (s)"}


def device_note(devices: Mapping[str, Sequence[str] | str] | None, names: Sequence[str]) -> str | None:
    """A warning for figures against wall time when the runs drawn trained on different devices
    (`devices`: name -> what it trained on, or a list of them for a setting of several seeds)."""
    used = set()
    for n in names:
        d = (devices or {}).get(n)
        used |= {d} if isinstance(d, str) else set(d or ())
    if len(used) < 2:
        return None
    return "Different devices: wall times do not compare (" + "; ".join(sorted(used)) + ")"


def loss_curves(runs_metrics: Mapping[str, Sequence[Mapping]], y: str = "train_loss", x: str = "step",
                smoothing: float = 0.0, log_y: bool = False, show_raw: bool = False,
                max_points: int = curves.MAX_POINTS, colors: Mapping[str, str] | None = None,
                title: str | None = None, groups: Mapping[str, Sequence[str]] | None = None,
                devices: Mapping[str, Sequence[str] | str] | None = None) -> go.Figure:
    """One line per run from its metrics.jsonl records (see core.analysis.curves for the fields).

    smoothing: EMA weight 0..0.99 (debiased); show_raw adds the unsmoothed line, faint.
    groups: setting name -> its runs (names in runs_metrics): a setting of several seeds is drawn
    as their mean with a shaded min-max band (run_groups.band); default: every run alone.
    devices: name (run or setting) -> what it trained on; against wall time, a note says when
    the lines come from different devices.
    Runs without any value for `y` get no line, and a note above the plot names them.
    """
    entries = dict(groups) if groups is not None else {n: [n] for n in runs_metrics}
    cmap = _colors(list(entries), colors)
    kind = curves.Y_SOURCES.get(y, ("step", ""))[0]
    fig = go.Figure()
    missing, drawn = [], []
    for name, members in entries.items():
        seeds = [runs_metrics[m] for m in members if m in runs_metrics]
        if len(seeds) > 1:
            xs, ys, lo, hi = band(seeds, y, x)
        else:
            (xs, ys), lo, hi = curves.series(seeds[0] if seeds else [], y, x), None, None
        if len(xs) == 0:
            missing.append(name)
            continue
        drawn.append(name)
        color = cmap[name]
        if lo is not None:
            for edge, fill in ((hi, None), (lo, "tonexty")):
                ex, ey = curves.downsample(xs, curves.ema(edge, smoothing), max_points)
                fig.add_trace(go.Scatter(x=ex, y=ey, mode="lines", line=dict(color=color, width=0), fill=fill,
                                         fillcolor=rgba(color, 0.22), showlegend=False, legendgroup=name,
                                         hoverinfo="skip", name=f"{name} (range)"))
        elif show_raw and smoothing > 0:
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
    notes = [f"no {Y_TITLES.get(y, y)} yet: {', '.join(missing)}"] if missing else []
    if x == "wall" and (note := device_note(devices, drawn)):
        notes.append(note)
    if notes:
        _note_above(fig, "<br>".join(wrap_lines(n, 44) for n in notes))
    _legend_below(fig, n_entries=len(drawn))
    return fig


def time_to_accuracy_bars(rows: Sequence[Mapping], threshold: float, by: str = "epochs",
                          colors: Mapping[str, str] | None = None, title: str | None = None) -> go.Figure:
    """Horizontal bars of epochs (by="epochs") or wall seconds (by="wall") to first reach
    `threshold`, one row per run or setting (`curves.epochs_to_accuracy_table` rows, "run" the
    name; optional "<key>_min"/"<key>_max" draw a setting's range as an error bar). Runs that
    never got there keep their row, marked "never". Names sit on the y axis, wrapped, one row
    each, so that six runs read as well as two."""
    key = f"{'epochs' if by == 'epochs' else 'wall'}_to_{threshold:g}"
    names = [r["run"] for r in rows]
    cmap = _colors(names, colors)
    ticks = {n: wrap_lines(n, 24) for n in names}
    fig = go.Figure()
    never = []
    for r in rows:
        n = r["run"]
        if r.get(key) is None:
            never.append(n)
            continue
        lo, hi = r.get(f"{key}_min"), r.get(f"{key}_max")
        err = None
        if lo is not None and hi is not None and hi > lo:
            err = dict(type="data", symmetric=False, array=[hi - r[key]], arrayminus=[r[key] - lo], thickness=2,
                       width=6, color="#333")
        fig.add_trace(go.Bar(x=[r[key]], y=[ticks[n]], name=n, orientation="h", marker_color=cmap[n], error_x=err,
                             text=[f"{r[key]:g}"], textposition="inside", insidetextanchor="start", textangle=0,
                             textfont=dict(size=TICK_SIZE, color="white"),
                             hovertemplate=f"{n}: %{{x:g}}<extra></extra>"))
    label = f"never reached {threshold:.0%}" if threshold <= 1 else f"never reached {threshold:g}"
    if never:
        fig.add_trace(go.Scatter(x=[0] * len(never), y=[ticks[n] for n in never], mode="text",
                                 text=[label] * len(never), textposition="middle right",
                                 textfont=dict(size=TICK_SIZE, color="#555"), showlegend=False, hoverinfo="skip",
                                 name="never"))
    lines = sum(t.count("<br>") + 1 for t in ticks.values())
    base_layout(fig, title, "epochs" if by == "epochs" else "wall time (s)", None,
                height=max(220, (130 if title else 90) + 30 * lines + 14 * len(names)))
    fig.update_layout(showlegend=False, bargap=0.25)
    fig.update_yaxes(categoryorder="array", categoryarray=[ticks[n] for n in names], autorange="reversed",
                     automargin=True)
    fig.update_xaxes(rangemode="tozero")
    return fig


def per_class_bars(classes: Sequence[str], accs_by_run: Mapping[str, Sequence[float | None]],
                   reference: str | None = None, colors: Mapping[str, str] | None = None,
                   title: str | None = None,
                   ranges: Mapping[str, tuple[Sequence[float | None], Sequence[float | None]]] | None = None
                   ) -> go.Figure:
    """Grouped bars, one group per class and one bar per run: validation accuracy in %, or with
    `reference` (one of the runs) each other run's difference to it in percentage points, which
    shows at a glance which classes a setting costs. `ranges`: name -> (min, max) per class of a
    setting's seeds (accuracies as fractions), drawn as error bars."""
    names = [n for n in accs_by_run if n != reference]
    cmap = _colors(list(accs_by_run), colors)
    ref = accs_by_run[reference] if reference else None
    hover = "%{x}: %{y:+.1f} points" if ref is not None else "%{x}: %{y:.1f} %"
    fig = go.Figure()
    for n in names:
        acc = list(accs_by_run[n])
        ys = [None if a is None else 100 * a for a in acc]
        if ref is not None:
            ys = [None if y is None or r is None else y - 100 * r for y, r in zip(ys, ref)]
        err = None
        if ranges and n in ranges:
            lo, hi = ranges[n]
            up = [None if a is None or h is None else 100 * (h - a) for a, h in zip(acc, hi)]
            down = [None if a is None or v is None else 100 * (a - v) for a, v in zip(acc, lo)]
            err = dict(type="data", symmetric=False, array=up, arrayminus=down, thickness=1.5, width=3, color="#333")
        fig.add_trace(go.Bar(x=list(classes), y=ys, name=n, marker_color=cmap[n], error_y=err,
                             hovertemplate=hover + "<extra>" + n + "</extra>"))
    base_layout(fig, title, None, "change (points)" if reference else "validation accuracy (%)")
    fig.update_layout(barmode="group", bargap=0.2)
    if ref is None:
        fig.update_yaxes(range=[0, 100])
    else:
        fig.add_hline(y=0, line_color="#444", line_width=1)
    return _legend_below(fig, n_entries=len(names))
