"""Plotly figure builders: data in, `go.Figure` out (README.md, Layout).

Nothing here computes beyond shaping data (picking, scaling for display, unit changes);
the numbers come from core.curves, core.features, core.attribution and friends, so every
figure a page shows can be built in a test without a model.

Conventions:
- one colour per run, from its name (`run_color`), the same on every page; `color_map`
  resolves clashes inside one selection, deterministically (pass it the widest list of runs
  a page knows, e.g. all runs on disk, so that colours stay put as the selection changes);
- projector-readable: white template, 18 px text, 16 px ticks (`base_layout`);
- at most `curves.MAX_POINTS` (2,000) points per trace.

Sections: colours and layout | training curves | memory vs accuracy | filters and spectra
| representations (CKA) | attributions | activation images | fidelity and memory (to come).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from . import curves
from .memory import format_bytes

# =======================================================================================
# Colours and layout
# =======================================================================================

# D3's ten (plotly's "D3"): no two of them look alike on a white projector screen. (Darker
# Tol colours were once appended; each had a near-twin here, e.g. #117733 beside #2CA02C.)
PALETTE = ("#1F77B4", "#FF7F0E", "#2CA02C", "#D62728", "#9467BD", "#8C564B", "#E377C2", "#7F7F7F",
           "#BCBD22", "#17BECF")
FONT_SIZE = 18
TICK_SIZE = 16
TITLE_SIZE = 24
TEMPLATE = "plotly_white"


def _hash(name: str) -> int:
    # not hash(): Python salts str hashes per process, and colours must survive restarts
    return int.from_bytes(hashlib.sha1(str(name).encode("utf-8")).digest()[:8], "big")


def run_color(run_name: str) -> str:
    """The run's colour, a pure function of its name (same on every page and every day)."""
    return PALETTE[_hash(run_name) % len(PALETTE)]


def color_map(names: Sequence[str]) -> dict[str, str]:
    """Colours for a selection of runs: each keeps `run_color` unless another run in the
    selection already has it, then the next free palette colour (probing from its hash).
    Names are placed in sorted order, so the answer does not depend on the order given.
    More runs than colours: the extra runs share (their own hashed colour)."""
    out: dict[str, str] = {}
    used: set[str] = set()
    n = len(PALETTE)
    for name in sorted(set(names), key=str):
        h = _hash(name)
        choice = PALETTE[h % n]
        if choice in used:
            free = [PALETTE[(h + i) % n] for i in range(1, n) if PALETTE[(h + i) % n] not in used]
            choice = free[0] if free else choice
        out[name] = choice
        used.add(choice)
    return out


def _colors(names: Sequence[str], colors: Mapping[str, str] | None) -> dict[str, str]:
    auto = color_map(names)
    return {n: (colors or {}).get(n, auto[n]) for n in names}


def _legend_below(fig: go.Figure, n_entries: int | None = None, height: int = 450) -> go.Figure:
    """Horizontal legend under the plot (after base_layout), so that a half-width figure keeps its
    plot area: the bottom margin grows by one legend row per entry (the worst case: long run
    names, one per row) and the figure grows with it."""
    n = len([t for t in fig.data if t.showlegend is not False]) if n_entries is None else n_entries
    if n == 0:
        return fig
    t = fig.layout.margin.t if fig.layout.margin.t is not None else 80
    b = 80 + 26 * n
    total = height + 26 * n
    plot_h = max(100, total - t - b)
    fig.update_layout(height=total, margin=dict(b=b),
                      legend=dict(orientation="h", x=0, xanchor="left", y=-78 / plot_h, yanchor="top",
                                  font=dict(size=TICK_SIZE)))
    return fig


def _wrap(text: str, width: int = 18, sep: str = " · ") -> str:
    """Break a long label into lines (plotly's <br>): at `sep` first, then at spaces, and a word
    longer than `width` after its slashes, colons and hyphens ("cifar10-jpeg/train"), so that
    no line is much longer than `width` characters. Short labels come back as they are."""
    text = str(text)
    if len(text) <= width:
        return text
    lines = []
    for part in text.split(sep):
        line = ""
        for word in part.split(" "):
            pieces = re.split(r"(?<=[/:-])", word) if len(word) > width else [word]
            for i, piece in enumerate(pieces):
                joined = (line + piece) if i else (f"{line} {piece}" if line else piece)
                if line and len(joined) > width:
                    lines.append(line)
                    line = piece
                else:
                    line = joined
        lines.append(line)
    return "<br>".join(lines)


def base_layout(fig: go.Figure, title: str | None = None, x_title: str | None = None, y_title: str | None = None,
                height: int | None = None) -> go.Figure:
    """White template, large text, tidy margins; sets the title and axis titles given."""
    fig.update_layout(
        template=TEMPLATE,
        font=dict(size=FONT_SIZE),
        # pinned to the top edge (not the middle of the top margin), so that a taller margin
        # (subplot titles, notes above the plot) opens room under the title instead of around it
        title=dict(text=title, font=dict(size=TITLE_SIZE), yref="container", y=1, yanchor="top",
                   pad=dict(t=18)) if title else None,
        legend=dict(font=dict(size=FONT_SIZE)),
        hoverlabel=dict(font=dict(size=FONT_SIZE)),
        margin=dict(l=70, r=30, t=80 if title else 40, b=60),
    )
    if height:
        fig.update_layout(height=height)
    fig.update_xaxes(tickfont=dict(size=TICK_SIZE), title_font=dict(size=FONT_SIZE))
    fig.update_yaxes(tickfont=dict(size=TICK_SIZE), title_font=dict(size=FONT_SIZE))
    if x_title is not None:
        fig.update_xaxes(title_text=x_title)
    if y_title is not None:
        fig.update_yaxes(title_text=y_title)
    return fig


def _to_uint8(img) -> np.ndarray:
    """(H, W) or (H, W, 3) floats in [0, 1] -> (H, W, 3) uint8 for go.Image."""
    a = np.asarray(img, dtype=np.float64)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    return (np.clip(a, 0, 1) * 255).round().astype(np.uint8)


def _hide_axes(fig: go.Figure) -> None:
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    # square pixels in every subplot
    fig.for_each_yaxis(lambda ax: ax.update(scaleanchor=ax.anchor or "x", constrain="domain"))


# =======================================================================================
# Training curves
# =======================================================================================

X_TITLES = {"step": "step", "epoch": "epoch", "wall": "wall time (s)"}
Y_TITLES = {"train_loss": "training loss", "train_acc": "training accuracy", "val_loss": "validation loss",
            "val_acc": "validation accuracy", "lr": "learning rate", "step_time": "time per step (s)"}


def _note_above(fig: go.Figure, text: str, width: int, lines: int) -> None:
    """A small wrapped note above the plot (the legend sits below it), with room made for it."""
    fig.add_annotation(text=_wrap(text, width, sep=", "), showarrow=False, xref="paper", yref="paper", x=0,
                       y=1.01, xanchor="left", yanchor="bottom", font=dict(size=TICK_SIZE - 2))
    fig.update_layout(margin=dict(t=(fig.layout.margin.t or 40) + 22 * lines))


def loss_curves(runs_metrics: Mapping[str, Sequence[Mapping]], y: str = "train_loss", x: str = "step",
                smoothing: float = 0.0, log_y: bool = False, show_raw: bool = False,
                max_points: int = curves.MAX_POINTS, colors: Mapping[str, str] | None = None,
                title: str | None = None) -> go.Figure:
    """One line per run from its metrics.jsonl records (see core.curves for the fields).

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


# =======================================================================================
# Memory vs accuracy
# =======================================================================================

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


# =======================================================================================
# Filters and spectra
# =======================================================================================

def filter_grid_figure(images: Mapping[str, np.ndarray], title: str | None = None, cols: int = 4,
                       colors: Mapping[str, str] | None = None) -> go.Figure:
    """Filter mosaics (from features.filter_grid / channel_grid) side by side, one per run;
    each panel is titled with the run name in its colour."""
    names = list(images)
    cmap = _colors(names, colors)
    cols = max(1, min(cols, len(names)))
    rows = -(-len(names) // cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=names, horizontal_spacing=0.03,
                        vertical_spacing=min(0.08, 0.5 / rows))
    for i, name in enumerate(names):
        fig.add_trace(go.Image(z=_to_uint8(images[name]), name=name, hoverinfo="skip"),
                      row=i // cols + 1, col=i % cols + 1)
    _hide_axes(fig)
    base_layout(fig, title, height=120 + 320 * rows)
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
                   log_y: bool = True, y_title: str = "share of filter power", colors: Mapping[str, str] | None = None,
                   title: str | None = None) -> go.Figure:
    """Radially averaged filter power spectra, one line per run.

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
    if log_y:
        fig.update_yaxes(type="log")
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
    base_layout(fig, title, "layer", "energy above ½ Nyquist")
    fig.update_layout(barmode="group")
    fig.update_yaxes(tickformat=".0%")
    return fig


# =======================================================================================
# Representations (CKA)
# =======================================================================================

def _matrix_heatmap(fig, z, x, y, zmin, zmax, colorscale, colorbar_title):
    z = np.asarray(z, dtype=np.float64)
    show_text = z.size <= 400
    fig.add_trace(go.Heatmap(z=z, x=list(x), y=list(y), zmin=zmin, zmax=zmax, colorscale=colorscale,
                             colorbar=dict(title=dict(text=colorbar_title), tickfont=dict(size=TICK_SIZE)),
                             texttemplate="%{z:.2f}" if show_text else None,
                             textfont=dict(size=TICK_SIZE) if show_text else None,
                             hovertemplate="%{y} vs %{x}: %{z:.3f}<extra></extra>"))
    fig.update_yaxes(autorange="reversed")


def cka_heatmap(names_a: Sequence[str], names_b: Sequence[str], matrix, title: str | None = None,
                label_a: str = "model A", label_b: str = "model B") -> go.Figure:
    """Linear CKA between layers of two models (rows: A's layers, top = first; columns: B's)."""
    fig = go.Figure()
    _matrix_heatmap(fig, matrix, names_b, names_a, 0.0, 1.0, "Viridis", "CKA")
    base_layout(fig, title, f"{label_b} layer", f"{label_a} layer",
                height=max(450, 120 + 42 * len(names_a)))
    return fig


# =======================================================================================
# Attributions
# =======================================================================================

def _class_label(classes: Sequence[str] | None, c) -> str:
    c = int(c)
    return classes[c] if classes is not None and 0 <= c < len(classes) else str(c)


def attribution_grid(images, attributions_by_model: Mapping[str, object], predictions: Mapping | None = None,
                     classes: Sequence[str] | None = None, targets=None, title: str | None = None,
                     colors: Mapping[str, str] | None = None) -> go.Figure:
    """Images (rows) x models (columns): the input, then each model's attribution map.

    images: (B, H, W, 3) in [0, 1] (features.denormalize); attributions_by_model: name ->
    (B, H, W); predictions: name -> {"class", "confidence"} as from compare_models. Each
    map is scaled by its own max |value| for display: a diverging red/blue scale when any
    map is signed, else a sequential one. Column headers carry each model's colour.
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
        tgt = f"target {_class_label(classes, _numpy(targets)[i])}" if targets is not None else ""
        subtitles.append(("input<br>" if i == 0 else "") + tgt)
        title_colors.append(None)
        for n in names:
            pred = ""
            if predictions is not None and n in predictions:
                p = predictions[n]
                pred = f"{_class_label(classes, _numpy(p['class'])[i])} {float(_numpy(p['confidence'])[i]):.0%}"
            # long run names wrap (at " · ", then at ~18 characters) so that columns' titles do not collide
            subtitles.append((f"{_wrap(n)}<br>" if i == 0 else "") + pred)
            title_colors.append(cmap[n] if i == 0 else None)
    head_lines = max(t.count("<br>") + 1 for t in subtitles[:cols]) if subtitles else 1
    fig = make_subplots(rows=n_img, cols=cols, subplot_titles=subtitles, horizontal_spacing=0.01,
                        vertical_spacing=0.25 / max(n_img, 1))
    for i in range(n_img):
        fig.add_trace(go.Image(z=_to_uint8(imgs[i]), name="input", hoverinfo="skip"), row=i + 1, col=1)
        for j, n in enumerate(names):
            m = maps[n][i]
            scale = np.abs(m).max()
            fig.add_trace(go.Heatmap(z=m / scale if scale > 0 else m, coloraxis="coloraxis", name=n,
                                     hovertemplate=f"{n}: %{{z:.2f}}<extra></extra>"), row=i + 1, col=j + 2)
            fig.update_yaxes(autorange="reversed", row=i + 1, col=j + 2)
    fig.update_layout(coloraxis=dict(colorscale="RdBu_r" if signed else "Inferno", cmin=-1 if signed else 0, cmax=1,
                                     colorbar=dict(title=dict(text="relative<br>attribution"))))
    _hide_axes(fig)
    title_font = TICK_SIZE - 2
    top = (70 if title else 20) + int(1.3 * title_font * head_lines)  # the figure title clears the column titles
    base_layout(fig, title, height=top + 60 + 200 * n_img)
    fig.update_layout(margin=dict(t=top))
    # make_subplots leaves out empty titles: pair the annotations with the non-empty ones
    for ann, color in zip(fig.layout.annotations, [c for t, c in zip(subtitles, title_colors) if t]):
        ann.font = dict(size=title_font, color=color) if color else dict(size=title_font)
    return fig


def _numpy(v):
    if hasattr(v, "detach"):
        return v.detach().cpu().numpy()
    return np.asarray(v)


def agreement_heatmap(names: Sequence[str], matrix, metric: str = "spearman", title: str | None = None) -> go.Figure:
    """Mean agreement between models' attribution maps (attribution.agreement_matrix):
    Spearman rank correlation (-1..1) or top-k% IoU (0..1)."""
    fig = go.Figure()
    label = {"spearman": "Spearman ρ", "topk_iou": "top-k IoU"}.get(metric, metric)
    zmin = -1.0 if metric == "spearman" else 0.0
    _matrix_heatmap(fig, matrix, names, names, zmin, 1.0, "RdBu_r" if zmin < 0 else "Viridis", label)
    base_layout(fig, title, "model", "model", height=max(400, 150 + 60 * len(names)))
    return fig


# =======================================================================================
# Activation images
# =======================================================================================

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


# =======================================================================================
# Gradient fidelity and memory
# (builders for the fidelity and memory pages are appended below by their owner)
# =======================================================================================

# ---------------------------------------------------------------------------------------
# [fidelity & memory builders] -- owned by core/fidelity.py + memory ladder/planner.
# Inputs are the result objects (FidelityResult, FidelityHistory, MemoryLadder, MemoryPlan)
# or their `to_dict()` forms, so a page can cache plain dicts. No torch import here.
# ---------------------------------------------------------------------------------------

FIDELITY_METRIC_LABELS = {"cosine": "cosine similarity", "rel_error": "relative L2 error",
                          "sign_agreement": "sign agreement", "projection": "projection ratio ⟨g̃,g⟩/‖g‖²",
                          "norm_ratio": "norm ratio ‖g̃‖/‖g‖"}
KIND_COLORS = {"conv input": "#1F77B4", "BN input": "#FF7F0E", "ReLU state": "#2CA02C", "linear input": "#9467BD",
               "checkpoint input": "#8C564B", "other": "#7F7F7F"}


def _plain(obj) -> Mapping:
    """A result object or its dict form -> dict."""
    return obj.to_dict() if hasattr(obj, "to_dict") else obj


def _fidelity_scale(metric: str, values) -> dict:
    vals = [v for v in values if v is not None and np.isfinite(v)]
    if metric in ("projection", "norm_ratio"):  # 1 = right size: diverging around 1
        span = max([abs(v - 1) for v in vals] + [0.05])
        return dict(zmin=1 - span, zmax=1 + span, colorscale="RdBu", zmid=1)
    if metric == "rel_error":
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
    base_layout(fig, title or f"{setting}: exact vs compressed weight gradient", "layer", "value")
    fig.update_layout(barmode="group", legend=dict(orientation="h", y=1.02, yanchor="bottom", x=0))
    fig.update_xaxes(tickangle=-45)
    rel_x = (d.get("input_rel_error") or {}).get(setting)
    if rel_x is not None:
        fig.add_annotation(text=f"input-gradient relative error {rel_x:.1e}", showarrow=False, xref="paper",
                           yref="paper", x=1, y=1.12, xanchor="right", font=dict(size=TICK_SIZE))
    return fig


def _history_mean(h: Mapping, metric: str) -> list:
    table = h[metric]
    out = []
    for i in range(len(h["steps"])):
        vals = [table[n][i] for n in h["layers"] if table[n][i] is not None]
        out.append(sum(vals) / len(vals) if vals else None)
    return out


def fidelity_over_training_figure(history, metric: str = "cosine", layers: Sequence[str] | None = None,
                                  colors: Mapping[str, str] | None = None, title: str | None = None) -> go.Figure:
    """Fidelity records of training (core.fidelity.fidelity_over_training) against the step.

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


# =======================================================================================
# [app builders] -- for the Streamlit pages (app.py, pages/); owned by the app issue.
# Data in, go.Figure out, like everything above.
# =======================================================================================

def method_figure(image, activation, pooled, restored, k: int, pool: str = "avg", layer: str = "",
                  channel: int = 0, sizes: Mapping[str, int | None] | None = None, title: str | None = None
                  ) -> go.Figure:
    """The method in one picture: the input image, then one channel of a conv's input as the
    forward pass uses it (exact), the K x K pooled copy kept for backward, and what backward
    rebuilds from it (nearest upsampling). The three maps share one colour scale; panel titles
    carry the bytes each takes (`sizes`: {"full", "pooled", "mask"} per image, all channels)."""
    sizes = dict(sizes or {})
    act, pooled, restored = (np.asarray(a, dtype=np.float64) for a in (activation, pooled, restored))
    full_b, pool_b, mask_b = sizes.get("full"), sizes.get("pooled"), sizes.get("mask")
    heads = ["input image",
             "forward pass uses" + (f"<br>{format_bytes(full_b)}" if full_b else ""),
             f"kept for backward<br>({pool} pool {k}×{k})" + (f"<br>{format_bytes(pool_b)}" if pool_b else "")
             + (f" + mask {format_bytes(mask_b)}" if mask_b else ""),
             "backward pass gets back" + ("<br>(upsampled)" if k > 1 else "<br>(the same: K=1)")]
    fig = make_subplots(rows=1, cols=4, subplot_titles=heads, horizontal_spacing=0.06)
    fig.add_trace(go.Image(z=_to_uint8(image), hoverinfo="skip", name="input"), row=1, col=1)
    lo = float(min(act.min(), restored.min()))
    hi = float(max(act.max(), restored.max()))
    for col, (z, name) in enumerate(((act, "forward"), (pooled, "kept"), (restored, "backward")), start=2):
        fig.add_trace(go.Heatmap(z=z, coloraxis="coloraxis", name=name,
                                 hovertemplate=name + " (%{y}, %{x}): %{z:.3f}<extra></extra>"), row=1, col=col)
        fig.update_yaxes(autorange="reversed", row=1, col=col)
    fig.update_layout(coloraxis=dict(colorscale="Viridis", cmin=lo, cmax=hi if hi > lo else lo + 1,
                                     colorbar=dict(title=dict(text="activation"), tickfont=dict(size=TICK_SIZE))))
    _hide_axes(fig)
    head = title if title is not None else (f"{layer}, channel {channel}" if layer else None)
    base_layout(fig, head, height=420)
    for ann in fig.layout.annotations:
        ann.font = dict(size=TICK_SIZE)
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
