"""Memory: the ladder, the planner, bytes per image, memory of runs while training."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go

from ...method.meter import format_bytes, largest_makers
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
    base_layout(fig, title or f"Saved activations, {model}, batch {d.get('batch')}", None,
                "saved activations (MiB)")
    fig.update_layout(barmode="stack")
    # policy names upright, broken before each '+' when long: tilted, six of them at 1024 px ran
    # into the axis title and the legend
    ticks = [p if len(p) <= 9 else p.replace("+", "<br>+") for p in policies]
    lines = max(t.count("<br>") + 1 for t in ticks) if ticks else 1
    fig.update_xaxes(tickvals=policies, ticktext=ticks, tickangle=0)
    # the legend under the plot: above it, wrapped to two rows at 1024 px, it ran into the title
    _legend_below(fig, n_entries=-(-len(kinds) // 2), height=480, gap=20 + 22 * lines)
    ymax = max([s["total_bytes"] for s in steps] + [1]) / 2 ** 20
    fig.update_yaxes(range=[0, ymax * 1.3])
    return fig


def _plan_line(p: Mapping) -> tuple[float, float]:
    """(a, b) with predicted peak bytes = a + b * batch, from a MemoryPlan dict (as
    MemoryPlan.predict: the CUDA peak fit, or model state + saved activations + the backward's
    transients where they were measured)."""
    if p.get("peak_fit"):
        a, b = p["peak_fit"]
        return float(a), float(b)
    a, b = p["saved_fit"]
    ta, tb = p.get("transient_fit") or (0.0, 0.0)
    return float(a) + float(ta) + float(p["model_state"]["total"]), float(b) + float(tb)


def planner_measure(plans) -> str:
    """What planner_figure's "predicted GiB" is, for the page's caption."""
    plans = [_plain(p) for p in plans]
    if plans and plans[0].get("peak_fit"):
        batches = plans[0].get("peak_fit_batches") or []
        return "CUDA max_memory_allocated, fitted over batches " + ", ".join(map(str, batches))
    if plans and plans[0].get("transient_fit"):
        return "model state + saved activations + the backward's transients (the CPU step peak)"
    return "model state + saved activations (a lower bound of the peak)"


def _batch_labels(largest: Sequence[int | None], top: float) -> dict[int, tuple[str, str]]:
    """plan index -> (text, position) of the largest-batch labels. Diamonds closer than a tenth
    of the axis share one label (their range, "5065–5649"): three policies within 600 images of
    each other printed their numbers over each other. Groups alternate below-right and
    above-left of their first diamond, the first one below (the budget's label is above the
    line's left end)."""
    order = sorted((n, k) for k, n in enumerate(largest) if n)
    groups: list[list[tuple[int, int]]] = []
    for n, k in order:
        if groups and n - groups[-1][-1][0] < 0.1 * top:
            groups[-1].append((n, k))
        else:
            groups.append([(n, k)])
    out = {}
    for j, g in enumerate(groups):
        text = str(g[0][0]) if len(g) == 1 else f"{g[0][0]}–{g[-1][0]}"
        out[g[0][1]] = (text, "bottom right" if j % 2 == 0 else "top left")
    return out


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
    labels = _batch_labels(largest, top)
    fig = go.Figure()
    for k, (p, (a, b), n) in enumerate(zip(plans, lines, largest)):
        c = cmap[p["policy"]]
        fig.add_trace(go.Scatter(x=xs, y=(a + b * xs) / 2 ** 30, mode="lines", name=p["policy"],
                                 line=dict(color=c, width=3), legendgroup=p["policy"],
                                 hovertemplate="batch %{x:.0f}<br>%{y:.2f} GiB<extra>" + p["policy"] + "</extra>"))
        if n:
            text, pos = labels.get(k, ("", "top left"))
            fig.add_trace(go.Scatter(x=[n], y=[(a + b * n) / 2 ** 30], mode="markers+text", text=[text],
                                     textposition=pos, textfont=dict(size=TICK_SIZE - 2, color="#333"),
                                     cliponaxis=False,
                                     marker=dict(color=c, size=14, symbol="diamond",
                                                 line=dict(color="black", width=1)),
                                     name=f"{p['policy']}: largest batch {n}", legendgroup=p["policy"],
                                     showlegend=False,
                                     hovertemplate=f"{p['policy']}: largest batch {n}"
                                                   "<br>%{y:.2f} GiB<extra></extra>"))
    # the budget's label above the left end of its line, on white: the lines start at zero there,
    # far below the budget, and the first diamonds' label goes below the line
    fig.add_hline(y=budget / 2 ** 30, line=dict(color="black", dash="dash", width=2),
                  annotation=dict(text=f"budget {budget / 2 ** 30:.1f} GiB", bgcolor="rgba(255,255,255,0.9)",
                                  font=dict(size=TICK_SIZE - 2)),
                  annotation_position="top left", annotation_yshift=4)
    model = plans[0].get("model", "") if plans else ""
    # the axis title stays short; what "predicted" means (CUDA peak fitted, or model state +
    # saved activations as a lower bound) is for the caption, see `planner_measure`
    base_layout(fig, title or f"Predicted training memory, {model}", "batch size", "predicted GiB")
    fig.update_yaxes(rangemode="tozero")
    return _legend_below(fig, n_entries=-(-len(plans) // 2), height=480)


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


def _maker_label(made_by: str) -> str:
    """"aten::mul in ExpBackward0" -> "mul · ExpBackward0": the op, then the node or Function around it."""
    return made_by.replace("aten::", "").replace(" in ", " · ")


def peak_makers_figure(result: Mapping, most: int = 8, title: str | None = None) -> go.Figure:
    """What was alive at a training step's peak (analysis.bench.step_peak_makers), one bar per op
    that made it, largest first: made in the backward (gradients, what a backward rebuilds) in one
    colour, in the forward (what it keeps, what is in flight) in another; past the `most`
    largest, the rest in one grey bar."""
    groups = largest_makers(result["at_peak"], most)

    def made_in(g) -> str:
        return "smaller, either pass" if g.get("other") else (
            "made in the backward" if "Backward" in g["made_by"] else "made in the forward")

    fig = go.Figure()
    for name, color in (("made in the forward", PALETTE[0]), ("made in the backward", PALETTE[1]),
                        ("smaller, either pass", "#9E9E9E")):
        picked = [g for g in groups if made_in(g) == name]
        if not picked and name == "smaller, either pass":
            continue
        fig.add_trace(go.Bar(x=[g["bytes"] / 2 ** 20 for g in picked], y=[_maker_label(g["made_by"]) for g in picked],
                             orientation="h", name=name, marker_color=color,
                             text=[f"{format_bytes(g['bytes'])} · {g['tensors']}×" for g in picked],
                             textposition="auto", textfont=dict(size=TICK_SIZE),
                             hovertemplate="%{y}<br>%{text}<extra>" + name + "</extra>"))
    base_layout(fig, title or (f"Step peak of {result['policy']}: {format_bytes(result['peak_bytes'])} alive "
                               f"({format_bytes(result['saved_bytes'])} saved)"),
                "MiB alive at the peak", None, height=200 + 44 * len(groups))
    order = [_maker_label(g["made_by"]) for g in groups]  # largest first, "other" last
    fig.update_yaxes(categoryorder="array", categoryarray=order[::-1])  # top to bottom
    fig.update_layout(legend=dict(orientation="h", y=1.0, yanchor="bottom", x=0))
    return fig


def run_memory_bars(rows: Sequence[Mapping], colors: Mapping[str, str] | None = None, title: str | None = None
                    ) -> go.Figure:
    """Recorded memory of runs: saved activations (in the run's colour) with model state stacked
    on top (grey). rows: {"name", "saved_bytes", "state_bytes", "batch"}. The saved bars have no
    legend entry: a legend swatch takes the first bar's colour, which named one run's colour
    "saved activations"; the axis names them."""
    names = [r["name"] for r in rows]
    cmap = _colors(names, colors)
    fig = go.Figure()
    fig.add_trace(go.Bar(x=names, y=[(r.get("saved_bytes") or 0) / 2 ** 20 for r in rows], name="saved activations",
                         marker_color=[cmap[n] for n in names],
                         text=[f"batch {r.get('batch')}" if r.get("batch") else "" for r in rows],
                         textposition="inside", textfont=dict(size=TICK_SIZE), showlegend=False,
                         hovertemplate="%{x}<br>saved activations %{y:.1f} MiB<extra></extra>"))
    fig.add_trace(go.Bar(x=names, y=[(r.get("state_bytes") or 0) / 2 ** 20 for r in rows],
                         name="model state (params, grads, optimiser)", marker_color="#B0B0B0",
                         hovertemplate="%{x}<br>model state %{y:.1f} MiB<extra></extra>"))
    base_layout(fig, title, None, "MiB: saved (run's colour) + state (grey)", height=480)
    fig.update_layout(barmode="stack", legend=dict(orientation="h", y=1.0, yanchor="bottom", x=0),
                      margin=dict(t=130 if title else 70))
    return fig


def memory_over_training(runs_metrics: Mapping[str, Sequence[Mapping]], max_points: int = curves.MAX_POINTS,
                         colors: Mapping[str, str] | None = None, title: str | None = None) -> go.Figure:
    """Memory each run recorded while it trained, against the step, in MiB from zero: a GPU run's
    CUDA peak (max_memory_allocated so far; solid), a CPU run's saved activations per step
    (measured by the meter at its first step: the policy fixes them, so the line is flat;
    dotted), so that a CPU run shows what it did record instead of nothing."""
    cmap = _colors(list(runs_metrics), colors)
    fig = go.Figure()
    kinds = set()
    for name, records in runs_metrics.items():
        steps = [r for r in records if r.get("type") == "step" and isinstance(r.get("step"), (int, float))]
        cuda = [(r["step"], r["cuda_peak"]) for r in steps if isinstance(r.get("cuda_peak"), (int, float))]
        saved = next((r["saved_bytes"] for r in steps if isinstance(r.get("saved_bytes"), (int, float))), None)
        if cuda:
            xs, ys = curves.downsample(np.array([p[0] for p in cuda], dtype=np.float64),
                                       np.array([p[1] for p in cuda], dtype=np.float64) / 2 ** 20, max_points)
            fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", name=f"{name} · CUDA peak",
                                     line=dict(color=cmap[name], width=3),
                                     hovertemplate="step %{x}<br>%{y:.0f} MiB<extra>" + name + "</extra>"))
            kinds.add("cuda")
        elif saved is not None:
            xs = [steps[0]["step"], steps[-1]["step"]]
            fig.add_trace(go.Scatter(x=xs, y=[saved / 2 ** 20] * 2, mode="lines+markers",
                                     name=f"{name} · saved activations",
                                     line=dict(color=cmap[name], width=3, dash="dot"), marker=dict(size=8),
                                     hovertemplate="step %{x}<br>%{y:.0f} MiB<extra>" + name + "</extra>"))
            kinds.add("saved")
    y_title = {frozenset({"cuda"}): "CUDA peak (MiB)", frozenset({"saved"}): "saved activations (MiB)"}.get(
        frozenset(kinds), "MiB")
    base_layout(fig, title, "step", y_title)
    fig.update_yaxes(rangemode="tozero")
    if "saved" in kinds:
        _note_above(fig, "dotted: saved activations of a step, measured once (CPU runs record no peak; "
                         "the policy fixes what a step keeps)")
    if not fig.data:
        fig.add_annotation(text="no memory recorded yet", showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5,
                           font=dict(size=FONT_SIZE))
    _legend_below(fig)
    return fig
