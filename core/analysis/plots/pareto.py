"""The accuracy-vs-memory plot: one marker per run or setting, one Pareto front per schedule."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import plotly.graph_objects as go

from .. import curves
from .common import TICK_SIZE, _colors, _legend_below, base_layout

FRONT_DASHES = ("dash", "dot", "dashdot", "longdash")


POSITIONS = ("top center", "bottom center", "middle right", "middle left", "top right", "top left", "bottom right",
             "bottom left")
# the narrowest plot area the app draws this figure in (a 1024 px page with the sidebar open), and
# how much room a label of TICK_SIZE takes there: labels placed apart at this size stay apart wider
PLOT_W, PLOT_H, CHAR_W, LINE_H, MARKER_R = 480.0, 360.0, 9.0, 20.0, 10.0


def _label(r: Mapping, with_epochs: bool) -> str:
    pol = str(r.get("policy", ""))
    return f"{pol} · {r['epochs']} ep" if with_epochs and r.get("epochs") is not None else pol


def _box(x: float, y: float, width: float, pos: str) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) in px of a label at `pos` of a marker at (x, y)."""
    vert, horiz = pos.split()
    top = {"top": y - MARKER_R - LINE_H, "middle": y - LINE_H / 2, "bottom": y + MARKER_R}[vert]
    left = {"center": x - width / 2, "right": x + MARKER_R, "left": x - MARKER_R - width}[horiz]
    if vert != "middle" and horiz != "center":  # plotly puts corner labels beside the marker's edge
        left = x + MARKER_R / 2 if horiz == "right" else x - MARKER_R / 2 - width
    return left, top, left + width, top + LINE_H


def _overlap(a, b) -> float:
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def _label_positions(rows: Sequence[Mapping], texts: Sequence[str], xr: tuple, yr: tuple) -> dict[int, str]:
    """Where each labelled marker's label goes: the first of POSITIONS (above, below, right,
    left, corners) whose box, estimated in px of the narrowest plot, covers no marker and no label
    placed before it (the most accurate runs are placed first); the least covered one if none is
    free. One label per policy and schedule, on its most accurate run: runs of one policy share
    their memory, so a second label would sit on the first (the legend names every run)."""
    best: dict[tuple, int] = {}
    for i, r in enumerate(rows):
        if r.get("memory") is not None and r.get("acc") is not None:
            key = (str(r.get("policy", "")), r.get("epochs"))
            if key not in best or r["acc"] > rows[best[key]]["acc"]:
                best[key] = i

    def px(r: Mapping) -> tuple[float, float]:
        return ((r["memory"] / 2 ** 20 - xr[0]) / (xr[1] - xr[0]) * PLOT_W,
                (yr[1] - r["acc"]) / (yr[1] - yr[0]) * PLOT_H)

    taken = [(x - MARKER_R, y - MARKER_R, x + MARKER_R, y + MARKER_R)
             for x, y in (px(r) for r in rows if r.get("memory") is not None and r.get("acc") is not None)]
    position: dict[int, str] = {}
    for i in sorted(best.values(), key=lambda j: -rows[j]["acc"]):
        x, y = px(rows[i])
        width = CHAR_W * len(texts[i])
        boxes = {pos: _box(x, y, width, pos) for pos in POSITIONS}
        inside = [p for p in POSITIONS if boxes[p][0] >= -60 and boxes[p][2] <= PLOT_W + 25 and boxes[p][1] >= -25]
        cost = {p: sum(_overlap(boxes[p], t) for t in taken) for p in inside or POSITIONS}
        choice = min(cost, key=lambda p: (cost[p] > 0, cost[p], POSITIONS.index(p)))
        position[i] = choice
        taken.append(boxes[choice])
    return position


def pareto_scatter(rows: Sequence[Mapping], memory_label: str = "saved activations",
                   colors: Mapping[str, str] | None = None, title: str | None = None) -> go.Figure:
    """Accuracy against memory, one marker per run; the Pareto front (less memory, more
    accuracy) as a dashed staircase, its runs drawn as diamonds.

    rows: {"name", "policy", "acc", "memory" (bytes)}, optionally "epochs" (then each schedule
    length gets a front of its own, since a longer schedule is another trade-off, and, when
    there are several, labels say the epochs) and "acc_min"/"acc_max" (a setting of several seeds: its mean is "acc",
    the range an error bar). `memory_label` says which memory it is
    (docs/fidelity_and_memory.md): "saved activations", "CUDA peak", ...
    """
    names = [r["name"] for r in rows]
    cmap = _colors(names, colors)
    schedules: dict = {}
    for i, r in enumerate(rows):
        schedules.setdefault(r.get("epochs"), []).append(i)
    fronts = {e: [idx[j] for j in curves.pareto_front([(rows[i].get("memory"), rows[i].get("acc")) for i in idx])]
              for e, idx in schedules.items()}
    on_front = {i for f in fronts.values() for i in f}
    # the axes' ranges first: labels are placed in their px
    xs = [r["memory"] / 2 ** 20 for r in rows if r.get("memory") is not None and r.get("acc") is not None]
    ys = [v for r in rows if r.get("memory") is not None and r.get("acc") is not None
          for v in (r["acc"], r.get("acc_min", r["acc"]), r.get("acc_max", r["acc"]))]
    xr = yr = None
    if xs:
        span = (max(xs) - min(xs)) or max(abs(max(xs)), 1.0)
        xr = (min(xs) - 0.2 * span, max(xs) + 0.2 * span)
        yspan = (max(ys) - min(ys)) or max(abs(max(ys)) * 0.1, 0.01)
        yr = (min(ys) - 0.12 * yspan, max(ys) + 0.25 * yspan)
    with_epochs = len(schedules) > 1  # one schedule: the title says it
    texts = [_label(r, with_epochs) for r in rows]
    position = _label_positions(rows, texts, xr, yr) if xs else {}
    fig = go.Figure()
    for i, r in enumerate(rows):
        if r.get("memory") is None or r.get("acc") is None:
            continue
        on = i in on_front
        err = None
        lo, hi = r.get("acc_min"), r.get("acc_max")
        if lo is not None and hi is not None and hi > lo:
            err = dict(type="data", symmetric=False, array=[hi - r["acc"]], arrayminus=[r["acc"] - lo],
                       color=cmap[r["name"]], thickness=2.5, width=10)
        fig.add_trace(go.Scatter(
            x=[r["memory"] / 2 ** 20], y=[r["acc"]], mode="markers+text", name=r["name"], error_y=err,
            text=[texts[i] if i in position else ""],
            textposition=position.get(i, "top center"),
            textfont=dict(size=TICK_SIZE),
            cliponaxis=False,
            marker=dict(color=cmap[r["name"]], size=20 if on else 14, symbol="diamond" if on else "circle",
                        line=dict(color="black", width=1.5 if on else 0)),
            hovertemplate=f"{r['name']}<br>policy {r.get('policy', '')}<br>%{{x:.1f}} MiB<br>%{{y}}<extra></extra>"))
    for k, (e, front) in enumerate(fronts.items()):
        if len(front) > 1:
            fig.add_trace(go.Scatter(
                x=[rows[i]["memory"] / 2 ** 20 for i in front], y=[rows[i]["acc"] for i in front], mode="lines",
                name="Pareto front" if len(fronts) == 1 or e is None else f"Pareto front · {e} ep",
                line=dict(color="gray", dash=FRONT_DASHES[k % len(FRONT_DASHES)], width=2), line_shape="hv",
                hoverinfo="skip"))
    base_layout(fig, title, f"{memory_label} (MiB)", "accuracy")
    # legend under the plot: beside it, a dozen long run names take half the width and squeeze
    # the labelled markers together; a full-width figure fits two or more names per legend row
    _legend_below(fig, n_entries=-(-len(fig.data) // 2), height=520)  # taller: labels between markers
    accs = [r["acc"] for r in rows if r.get("acc") is not None]
    if accs and max(accs) <= 1:
        fig.update_yaxes(tickformat=".0%")
    if xr is not None:
        fig.update_xaxes(range=list(xr))
        fig.update_yaxes(range=list(yr))
    return fig
