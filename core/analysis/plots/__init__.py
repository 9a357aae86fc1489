"""Plotly figure builders: data in, `go.Figure` out, one file per kind of view.

Nothing here computes beyond shaping data (picking, scaling for display, unit changes); the
numbers come from the rest of core.analysis, so every figure a page shows can be built in a
test without a model. Conventions (common.py): one colour per run, from its name, the same on
every page; projector-readable text (18 px, 16 px ticks); at most `curves.MAX_POINTS` points a
trace.
"""

from .attribution import agreement_heatmap, attribution_grid
from .common import (
    FONT_SIZE,
    PALETTE,
    TEMPLATE,
    TICK_SIZE,
    TITLE_SIZE,
    base_layout,
    color_map,
    colorscale,
    keyed_colors,
    rgba,
    run_color,
    selection_colors,
    shown_colors,
)
from .features import activation_images_figure, cka_heatmap, filter_grid_figure, hf_share_bars, spectra_figure
from .fidelity import FIDELITY_METRIC_LABELS, fidelity_bars, fidelity_heatmap, fidelity_over_training_figure
from .memory import (
    KIND_COLORS,
    bytes_bars,
    memory_ladder_figure,
    memory_over_training,
    peak_makers_figure,
    planner_figure,
    planner_measure,
    run_memory_bars,
)
from .method import method_figure
from .pareto import pareto_scatter
from .training import X_TITLES, Y_TITLES, device_note, loss_curves, per_class_bars, time_to_accuracy_bars

__all__ = [
    "FIDELITY_METRIC_LABELS", "FONT_SIZE", "KIND_COLORS", "PALETTE", "TEMPLATE", "TICK_SIZE", "TITLE_SIZE",
    "X_TITLES", "Y_TITLES", "activation_images_figure", "agreement_heatmap", "attribution_grid", "base_layout",
    "bytes_bars", "cka_heatmap", "color_map", "colorscale", "device_note", "fidelity_bars", "fidelity_heatmap",
    "fidelity_over_training_figure", "filter_grid_figure", "hf_share_bars", "keyed_colors", "loss_curves",
    "memory_ladder_figure", "memory_over_training", "method_figure", "pareto_scatter", "peak_makers_figure",
    "per_class_bars", "planner_figure", "planner_measure",
    "rgba", "run_color", "run_memory_bars", "selection_colors", "shown_colors", "spectra_figure",
    "time_to_accuracy_bars",
]
