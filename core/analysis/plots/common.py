"""Colours and layout every figure shares: one colour per run, projector-readable text."""

from __future__ import annotations

import hashlib
import re
import textwrap
from collections.abc import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go

# D3's ten (plotly's "D3"): no two of them look alike on a white projector screen. (Darker
# Tol colours were once appended; each had a near-twin here, e.g. #117733 beside #2CA02C.)
PALETTE = ("#1F77B4", "#FF7F0E", "#2CA02C", "#D62728", "#9467BD", "#8C564B", "#E377C2", "#7F7F7F",
           "#BCBD22", "#17BECF")


FONT_SIZE = 18


TICK_SIZE = 16


TITLE_SIZE = 24


TEMPLATE = "plotly_white"


# characters of title a line holds in the narrowest figure the app draws (about 500 px: a page at
# 1024 px with the sidebar open); longer titles wrap instead of running out of the figure
TITLE_WIDTH = 38


# Streamlit's chart theme marks its own colours with placeholders #000001-#000040 and paints them
# over in the browser, whichever theme is chosen: Inferno's first stop, #000004, came out pink
_STREAMLIT_PLACEHOLDER = re.compile(r"^#0000(0[1-9]|[1-3][0-9]|40)$", re.I)


def colorscale(name: str) -> list[list]:
    """Plotly's named scale as stops, any Streamlit placeholder colour in it moved to black."""
    from plotly.colors import get_colorscale

    return [[pos, "#000000" if _STREAMLIT_PLACEHOLDER.match(c) else c] for pos, c in get_colorscale(name)]


def _hash(name: str) -> int:
    # not hash(): Python salts str hashes per process, and colours must survive restarts
    return int.from_bytes(hashlib.sha1(str(name).encode("utf-8")).digest()[:8], "big")


def run_color(run_name: str) -> str:
    """The run's colour, a pure function of its name (same on every page and every day)."""
    return PALETTE[_hash(run_name) % len(PALETTE)]


def rgba(color: str, alpha: float) -> str:
    """'#1F77B4' -> 'rgba(31,119,180,alpha)': a tint of a run's colour (bands, chips)."""
    c = color.lstrip("#")
    return f"rgba({int(c[0:2], 16)},{int(c[2:4], 16)},{int(c[4:6], 16)},{alpha})"


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


def selection_colors(all_names: Sequence[str], chosen: Sequence[str]) -> dict[str, str]:
    """Colours of the `chosen` runs (folder names) as the app shows them: each its colour among
    all runs on disk (color_map), so that it keeps it whatever else is chosen; with more runs on
    disk than colours two chosen runs may share one, and the later (in name order, so
    deterministically) then gets a colour no chosen run has."""
    cmap = color_map([*all_names, *chosen])
    out = {n: cmap[n] for n in chosen}
    taken: set[str] = set()
    for n in sorted(out):
        if out[n] in taken:
            free = [c for c in PALETTE if c not in taken and c not in out.values()]
            out[n] = free[0] if free else out[n]
        taken.add(out[n])
    return out


def _non_chip_colors(chip_colors) -> list[str]:
    """Palette colours no chip has (all of them when every one is a chip's: nothing to keep apart)."""
    taken = set(chip_colors)
    return [c for c in PALETTE if c not in taken] or list(PALETTE)


def shown_colors(all_names: Sequence[str], selected: Sequence[str], shown: Sequence[str]) -> dict[str, str]:
    """Colours of the runs `shown` in a figure, which may hold runs beyond the `selected` ones (a front
    of every run of a schedule) or only some of them: a selected run has its chip's colour
    (selection_colors over the whole selection, whatever the figure shows); any other takes its
    own colour among all runs if no selected or earlier-placed run has it, else the first palette
    colour none has (in name order). Once the palette runs out the others share colours, never a
    chip's (a reader would take the run for the selected one)."""
    chips = selection_colors(all_names, selected)
    out = {n: chips[n] for n in shown if n in chips}
    others = _non_chip_colors(chips.values())
    taken = set(chips.values())
    own = color_map([*all_names, *shown])
    for n in sorted({n for n in shown if n not in out}, key=str):
        c = own[n]
        if c in taken:
            free = [p for p in others if p not in taken]
            c = free[0] if free else (c if c in others else others[_hash(n) % len(others)])
        out[n] = c
        taken.add(c)
    return out


def keyed_colors(keys: Sequence[str], chips: Mapping[str, str]) -> dict[str, str]:
    """Colours of things that are not runs (policies, in the planner) drawn beside runs' chips:
    a key a chip stands for (`chips`: key -> the colour of a selected run of it) takes that
    colour, unless an earlier key has it; the others take, in order, palette colours no chip
    and no earlier key has. Once those run out they share the non-chip colours."""
    out: dict[str, str] = {}
    for k in keys:
        if k in chips and chips[k] not in out.values():
            out[k] = chips[k]
    others = _non_chip_colors(chips.values())
    for i, k in enumerate(k for k in keys if k not in out):
        free = [c for c in others if c not in out.values()]
        out[k] = free[0] if free else others[i % len(others)]
    return out


def _colors(names: Sequence[str], colors: Mapping[str, str] | None) -> dict[str, str]:
    auto = color_map(names)
    return {n: (colors or {}).get(n, auto[n]) for n in names}


def _legend_below(fig: go.Figure, n_entries: int | None = None, height: int = 450, gap: int = 78) -> go.Figure:
    """Horizontal legend under the plot (after base_layout), so that a half-width figure keeps its
    plot area: the bottom margin grows by one legend row per entry (the worst case: long run
    names, one per row) and the figure grows with it. `gap`: px between the plot and the legend
    (the x axis's tick labels and title sit there)."""
    n = len([t for t in fig.data if t.showlegend is not False]) if n_entries is None else n_entries
    if n == 0:
        return fig
    t = fig.layout.margin.t if fig.layout.margin.t is not None else 80
    b = gap + 2 + 26 * n
    total = height + 26 * n + (gap - 78)
    plot_h = max(100, total - t - b)
    fig.update_layout(height=total, margin=dict(b=b),
                      legend=dict(orientation="h", x=0, xanchor="left", y=-gap / plot_h, yanchor="top",
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


def wrap_lines(text: str, width: int) -> str:
    """Break text into lines of at most `width` characters at spaces (plotly's <br>); text that
    already has line breaks is left as it is."""
    text = str(text)
    if "<br>" in text or len(text) <= width:
        return text
    return "<br>".join(textwrap.wrap(text, width, break_on_hyphens=False, break_long_words=False))


def base_layout(fig: go.Figure, title: str | None = None, x_title: str | None = None, y_title: str | None = None,
                height: int | None = None) -> go.Figure:
    """White template, large text, tidy margins; sets the title and axis titles given. A long
    title wraps (TITLE_WIDTH) and the top margin makes room for its lines."""
    title = wrap_lines(title, TITLE_WIDTH) if title else title
    extra = 30 * title.count("<br>") if title else 0
    fig.update_layout(
        template=TEMPLATE,
        font=dict(size=FONT_SIZE),
        # pinned to the top edge (not the middle of the top margin), so that a taller margin
        # (subplot titles, notes above the plot) opens room under the title instead of around it
        title=dict(text=title, font=dict(size=TITLE_SIZE), yref="container", y=1, yanchor="top",
                   pad=dict(t=18)) if title else None,
        legend=dict(font=dict(size=FONT_SIZE)),
        hoverlabel=dict(font=dict(size=FONT_SIZE)),
        margin=dict(l=70, r=30, t=(80 + extra) if title else 40, b=60),
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


def _note_above(fig: go.Figure, text: str, width: int = 44) -> None:
    """A small note above the plot (the legend sits below it), wrapped to `width` characters (the
    narrowest figure holds about 50 of its size), with room made for every line it takes, so
    that it never reaches the title."""
    wrapped = wrap_lines(text, width)
    fig.add_annotation(text=wrapped, showarrow=False, xref="paper", yref="paper", x=0, align="left",
                       y=1.01, xanchor="left", yanchor="bottom", font=dict(size=TICK_SIZE - 2))
    fig.update_layout(margin=dict(t=(fig.layout.margin.t or 40) + 20 * (wrapped.count("<br>") + 1) + 6))


def _matrix_heatmap(fig, z, x, y, zmin, zmax, colorscale, colorbar_title):
    z = np.asarray(z, dtype=np.float64)
    show_text = z.size <= 400
    fig.add_trace(go.Heatmap(z=z, x=list(x), y=list(y), zmin=zmin, zmax=zmax, colorscale=colorscale,
                             colorbar=dict(title=dict(text=colorbar_title), tickfont=dict(size=TICK_SIZE)),
                             texttemplate="%{z:.2f}" if show_text else None,
                             textfont=dict(size=TICK_SIZE) if show_text else None,
                             hovertemplate="%{y} vs %{x}: %{z:.3f}<extra></extra>"))
    fig.update_yaxes(autorange="reversed")


def _numpy(v):
    if hasattr(v, "detach"):
        return v.detach().cpu().numpy()
    return np.asarray(v)


def _plain(obj) -> Mapping:
    """A result object or its dict form -> dict."""
    return obj.to_dict() if hasattr(obj, "to_dict") else obj
