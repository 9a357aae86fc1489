import math

import numpy as np
import plotly.graph_objects as go
import pytest
import torch

from core.analysis import curves
from core.analysis import plots as P

# -- synthetic metrics.jsonl records -------------------------------------------------------


def _records(n_steps=50, spe=10, acc_gain=0.18, seed=0):
    rng = np.random.default_rng(seed)
    recs = [{"type": "step", "step": s, "epoch": (s - 1) // spe, "loss": 2.0 / s ** 0.3 + 0.05 * rng.random(),
             "acc": min(1.0, 0.1 + s / 100), "lr": 0.1, "wall": 0.1 * s} for s in range(1, n_steps + 1)]
    recs += [{"type": "eval", "epoch": e, "step": spe * e, "val_loss": 1.0 / e, "val_acc": min(1.0, acc_gain * e),
              "wall": 1.0 * e} for e in range(1, n_steps // spe + 1)]
    recs.append({"type": "fidelity", "step": 10, "epoch": 0, "layers": {}})
    return recs


RUNS = {"baseline": _records(), "avg2+mask": _records(acc_gain=0.15, seed=1), "empty": []}


# -- colours and layout ------------------------------------------------------------------

def test_run_color_is_stable_and_from_palette():
    assert P.run_color("baseline") == P.run_color("baseline")
    assert P.run_color("baseline") in P.PALETTE and len(P.PALETTE) >= 10
    colours = {P.run_color(f"run{i}") for i in range(200)}
    assert len(colours) == len(P.PALETTE)  # the hash spreads over the whole palette


def test_color_map_avoids_collisions_deterministically():
    # find two names that hash to the same colour
    seen, pair = {}, None
    for i in range(1000):
        c = P.run_color(f"r{i}")
        if c in seen:
            pair = (seen[c], f"r{i}")
            break
        seen[c] = f"r{i}"
    cm = P.color_map(list(pair))
    assert cm[pair[0]] != cm[pair[1]]
    assert cm == P.color_map(list(reversed(pair)))  # order of the selection does not matter
    names = [f"run{i}" for i in range(len(P.PALETTE))]
    assert len(set(P.color_map(names).values())) == len(P.PALETTE)
    assert len(P.color_map([f"x{i}" for i in range(30)])) == 30  # more runs than colours still works


def test_base_layout_is_projector_readable():
    fig = P.base_layout(go.Figure(go.Scatter(x=[1], y=[1])), "T", "x axis", "y axis")
    assert fig.layout.font.size >= 16 and fig.layout.title.font.size >= 16
    assert fig.layout.xaxis.title.text == "x axis" and fig.layout.yaxis.title.text == "y axis"
    assert fig.layout.xaxis.tickfont.size >= 16
    assert fig.layout.template.layout.paper_bgcolor in ("white", "#fff", "#ffffff", "rgb(255,255,255)")


# -- curves helpers ----------------------------------------------------------------------

def test_series_and_epochs():
    recs = RUNS["baseline"]
    xs, ys = curves.series(recs, "train_loss", "step")
    assert len(xs) == 50 and xs[0] == 1
    xs, _ = curves.series(recs, "train_loss", "epoch")  # fractional epochs: step / steps per epoch
    assert xs[9] == pytest.approx(1.0) and xs[-1] == pytest.approx(5.0)
    xs, ys = curves.series(recs, "val_acc", "epoch")
    assert xs.tolist() == [1, 2, 3, 4, 5] and ys[0] == pytest.approx(0.18)
    assert curves.steps_per_epoch(recs) == 10
    with pytest.raises(ValueError):
        curves.series(recs, "bogus")


def test_ema_and_downsample():
    v = np.array([1.0, 1.0, 1.0, 5.0])
    assert np.allclose(curves.ema(v, 0.0), v)
    s = curves.ema(v, 0.9)
    assert s[0] == pytest.approx(1.0)  # debiased: no pull towards zero
    # by hand: 0.1 * (0.9^3 + 0.9^2 + 0.9 + 5) / (1 - 0.9^4)
    assert s[-1] == pytest.approx(0.1 * (0.729 + 0.81 + 0.9 + 5) / (1 - 0.9 ** 4))
    assert math.isnan(curves.ema([1.0, float("nan"), 2.0], 0.5)[1])
    xs, ys = curves.downsample(np.arange(10_000), np.arange(10_000), 2000)
    assert len(xs) <= 2000 and xs[0] == 0 and xs[-1] == 9999


def test_epochs_to_accuracy_and_pareto():
    assert curves.epochs_to_accuracy(RUNS["baseline"], 0.5)["epoch"] == 3
    assert curves.epochs_to_accuracy(RUNS["baseline"], 0.99) is None
    rows = curves.epochs_to_accuracy_table(RUNS, [0.5, 0.7])
    assert [r["run"] for r in rows] == list(RUNS)
    assert rows[0]["epochs_to_0.5"] == 3 and rows[1]["epochs_to_0.5"] == 4 and rows[2]["epochs_to_0.5"] is None
    assert rows[0]["best_val_acc"] == pytest.approx(0.9)
    pts = [(300, 0.90), (200, 0.89), (250, 0.80), (100, 0.50), (400, 0.95), (None, 1.0)]
    assert curves.pareto_front(pts) == [3, 1, 0, 4]


# -- builders ----------------------------------------------------------------------------

def test_loss_curves():
    fig = P.loss_curves(RUNS, y="train_loss", x="step")
    assert [t.name for t in fig.data] == ["baseline", "avg2+mask"]  # "empty" has no data
    assert fig.layout.xaxis.title.text == "step" and fig.layout.yaxis.title.text == "training loss"
    assert any("empty" in a.text for a in fig.layout.annotations)
    again = P.loss_curves({"avg2+mask": RUNS["avg2+mask"]}, y="val_acc", x="epoch", smoothing=0.5)
    assert again.data[0].line.color == P.run_color("avg2+mask")
    assert "EMA" in again.layout.yaxis.title.text and again.layout.xaxis.title.text == "epoch"
    raw = P.loss_curves(RUNS, smoothing=0.9, show_raw=True, log_y=True, x="wall")
    assert len(raw.data) == 4 and raw.layout.yaxis.type == "log"
    assert raw.layout.xaxis.title.text == "wall time (s)"
    assert raw.data[0].line.color == raw.data[1].line.color  # raw and smoothed share the run colour


def test_loss_curves_cap_points():
    long = [{"type": "step", "step": s, "epoch": 0, "loss": 1.0 / s, "wall": s} for s in range(1, 12_001)]
    fig = P.loss_curves({"long": long})
    assert len(fig.data[0].x) <= 2000


def test_colours_stable_across_figures():
    names = ["baseline", "avg2+mask"]
    fig1 = P.loss_curves({n: RUNS[n] for n in names})
    rows = [{"name": n, "policy": n, "acc": 0.9, "memory": 1e8} for n in names]
    fig2 = P.pareto_scatter(rows)
    c1 = {t.name: t.line.color for t in fig1.data}
    c2 = {t.name: t.marker.color for t in fig2.data if t.name in names}
    assert c1 == c2 == P.color_map(names)


def test_time_to_accuracy_bars():
    fig = P.time_to_accuracy_bars(curves.epochs_to_accuracy_table(RUNS, [0.5]), 0.5)
    assert [t.name for t in fig.data] == ["baseline", "avg2+mask", "never"]
    assert fig.layout.xaxis.title.text == "epochs"
    assert all(t.orientation == "h" for t in fig.data[:2])  # one row per run: names never collide
    assert list(fig.data[-1].y) == ["empty"] and fig.data[-1].text[0] == "never reached 50%"


def test_time_to_accuracy_bars_read_with_six_long_names():
    """Six runs with long names: a row each on the y axis, wrapped at 24 characters, the figure
    as tall as its rows (at 1024 px the old vertical bars' labels ran into each other)."""
    rows = [{"run": f"avg{k}-lowres+mask · CIFAR-10 · 20 ep · s{k}", "epochs_to_0.5": k} for k in range(6)]
    fig = P.time_to_accuracy_bars(rows, 0.5)
    ticks = [t.y[0] for t in fig.data]
    assert len(set(ticks)) == 6
    assert all(len(line) <= 24 for t in ticks for line in t.split("<br>"))
    assert fig.layout.height >= 6 * 40
    # a setting of several seeds: its range as an error bar
    ranged = P.time_to_accuracy_bars([{"run": "s", "epochs_to_0.5": 4.5, "epochs_to_0.5_min": 4,
                                       "epochs_to_0.5_max": 5}], 0.5)
    assert ranged.data[0].error_x.array == (0.5,) and ranged.data[0].error_x.arrayminus == (0.5,)


def test_per_class_groups_keep_runs_of_other_classes_apart():
    groups, missing = curves.per_class_groups({
        "a": (["cat", "dog"], [0.5, float("nan")]), "b": (["x", "y", "z"], [1.0, 0.0, 0.5]),
        "c": (["cat", "dog"], [0.25, 0.75]), "old": (["cat", "dog"], None), "cut": (["cat", "dog"], [0.5])})
    assert [g["classes"] for g in groups] == [["cat", "dog"], ["x", "y", "z"]]
    assert groups[0]["runs"] == {"a": [0.5, None], "c": [0.25, 0.75]}
    assert missing == ["old", "cut"]


def test_per_class_bars_absolute_and_against_a_reference():
    accs = {"none": [0.9, 0.5, None], "avg4": [0.8, 0.6, 0.7], "avg8": [0.45, 0.5, 0.1]}
    fig = P.per_class_bars(["a", "b", "c"], accs)
    assert [t.name for t in fig.data] == ["none", "avg4", "avg8"] and fig.layout.barmode == "group"
    assert list(fig.data[1].y) == pytest.approx([80, 60, 70])
    diff = P.per_class_bars(["a", "b", "c"], accs, reference="none")
    assert [t.name for t in diff.data] == ["avg4", "avg8"]  # the reference is the zero line
    assert diff.data[0].y[:2] == pytest.approx((-10, 10)) and diff.data[0].y[2] is None
    assert diff.data[1].y[:2] == pytest.approx((-45, 0))
    assert diff.data[0].marker.color == P.color_map(list(accs))["avg4"]


def test_pareto_scatter():
    rows = [{"name": "baseline", "policy": "none", "acc": 0.91, "memory": 300 * 2 ** 20},
            {"name": "pooled", "policy": "avg2+mask", "acc": 0.90, "memory": 200 * 2 ** 20},
            {"name": "bad", "policy": "max4", "acc": 0.70, "memory": 250 * 2 ** 20}]
    fig = P.pareto_scatter(rows, memory_label="CUDA peak")
    assert [t.name for t in fig.data] == ["baseline", "pooled", "bad", "Pareto front"]
    assert list(fig.data[-1].x) == [200, 300]
    assert fig.data[1].marker.symbol == "diamond" and fig.data[2].marker.symbol == "circle"
    assert fig.layout.xaxis.title.text == "CUDA peak (MiB)" and fig.layout.yaxis.title.text == "accuracy"
    assert fig.layout.legend.orientation == "h" and fig.layout.legend.y < 0  # under the plot, full width to it
    # a second run of a policy, less accurate, at the same memory: one label for the policy
    fig = P.pareto_scatter(rows + [{"name": "pooled, shorter", "policy": "avg2+mask", "acc": 0.88,
                                    "memory": 200 * 2 ** 20}])
    assert [t.text[0] for t in fig.data[:4]] == ["none", "avg2+mask", "max4", ""]


def _label_boxes(fig):
    """Each label's box in px of the narrowest plot the app draws (plots.pareto's estimate)."""
    from core.analysis.plots import pareto

    xr, yr = fig.layout.xaxis.range, fig.layout.yaxis.range
    out = []
    for t in fig.data:
        if t.mode == "markers+text" and t.text[0]:
            x = (t.x[0] - xr[0]) / (xr[1] - xr[0]) * pareto.PLOT_W
            y = (yr[1] - t.y[0]) / (yr[1] - yr[0]) * pareto.PLOT_H
            out.append(pareto._box(x, y, pareto.CHAR_W * len(t.text[0]), t.textposition))
    return out


def test_pareto_labels_of_crowded_policies_do_not_overlap():
    """The shipped 20-epoch CIFAR-10 runs: four policies of equal bytes within four points, K=4
    just left of them; at the narrowest width their labels used to print over each other."""
    from core.analysis.plots.pareto import _overlap

    mib = 2 ** 20
    rows = [{"name": n, "policy": n, "acc": a, "memory": m * mib} for n, a, m in (
        ("none", 0.862, 1.45), ("avg2+mask", 0.845, 0.92), ("max2+mask", 0.835, 0.92),
        ("avg2-lowres+mask", 0.825, 0.92), ("avg4+mask", 0.795, 0.78), ("avg8+mask", 0.616, 0.75),
        ("avg2+mask+bn8", 0.847, 0.38))]
    boxes = _label_boxes(P.pareto_scatter(rows))
    assert len(boxes) == 7
    assert all(_overlap(a, b) == 0 for i, a in enumerate(boxes) for b in boxes[i + 1:])


def test_pareto_compares_like_with_like_schedules():
    """A 100-epoch baseline, a 30-epoch avg2+mask and a 20-epoch bn8 are not one trade-off: each
    schedule gets its own front, and the labels say the epochs."""
    mib = 2 ** 20
    rows = [{"name": "none 20", "policy": "none", "epochs": 20, "acc": 0.86, "memory": 1.5 * mib},
            {"name": "bn8 20", "policy": "avg2+mask+bn8", "epochs": 20, "acc": 0.85, "memory": 0.4 * mib},
            {"name": "none 100", "policy": "none", "epochs": 100, "acc": 0.88, "memory": 1.5 * mib},
            {"name": "avg2 30", "policy": "avg2+mask", "epochs": 30, "acc": 0.857, "memory": 0.9 * mib},
            {"name": "none 30", "policy": "none", "epochs": 30, "acc": 0.867, "memory": 1.5 * mib}]
    fig = P.pareto_scatter(rows)
    fronts = {t.name: list(t.x) for t in fig.data if t.name.startswith("Pareto front")}
    assert fronts == {"Pareto front · 20 ep": [0.4, 1.5], "Pareto front · 30 ep": [0.9, 1.5]}
    labels = {t.name: t.text[0] for t in fig.data if t.mode == "markers+text"}
    assert labels["avg2 30"] == "avg2+mask · 30 ep" and labels["none 100"] == "none · 100 ep"
    # one schedule: the title says it, the labels need not
    one = P.pareto_scatter([r for r in rows if r["epochs"] == 20])
    assert [t.text[0] for t in one.data[:2]] == ["none", "avg2+mask+bn8"]
    assert [t.name for t in one.data][-1] == "Pareto front"


def test_pareto_draws_a_setting_of_several_seeds_with_its_range():
    rows = [{"name": "avg2+mask (2 seeds)", "policy": "avg2+mask", "acc": 0.8455, "acc_min": 0.8436,
             "acc_max": 0.8474, "memory": 2 ** 20}, {"name": "none", "policy": "none", "acc": 0.86, "memory": 2 ** 21}]
    fig = P.pareto_scatter(rows)
    err = fig.data[0].error_y
    assert err.array[0] == pytest.approx(0.0019) and err.arrayminus[0] == pytest.approx(0.0019)
    assert fig.data[1].error_y.array is None


def test_filter_grid_figure():
    fig = P.filter_grid_figure({"baseline": np.random.rand(15, 15, 3), "pooled": np.random.rand(15, 15)})
    assert len(fig.data) == 2 and all(isinstance(t, go.Image) for t in fig.data)
    assert [t.name for t in fig.data] == ["baseline", "pooled"]
    assert fig.data[1].z.shape == (15, 15, 3)  # grayscale shown as RGB
    assert [a.text for a in fig.layout.annotations] == ["baseline", "pooled"]
    assert fig.layout.annotations[0].font.color == P.color_map(["baseline", "pooled"])["baseline"]


def _spectra(hf):
    return [{"name": "conv1", "freqs": np.arange(12) / 16, "power": np.linspace(1, 0.1, 12), "hf_share": hf},
            {"name": "layer1.0.conv1", "freqs": np.arange(12) / 16, "power": np.linspace(1, 0.2, 12), "hf_share": hf}]


def test_spectra_and_hf_share():
    by_run = {"baseline": _spectra(0.2), "pooled": _spectra(0.1)}
    fig = P.spectra_figure(by_run, layer="layer1.0.conv1")
    assert [t.name for t in fig.data] == ["baseline", "pooled"]
    assert fig.layout.xaxis.title.text == "spatial frequency (cycles/pixel)" and fig.layout.yaxis.type == "log"
    # labels at the powers of ten only: plotly's minor labels ("2", "5") read as values on a log axis
    assert fig.layout.yaxis.dtick == 1 and fig.layout.yaxis.exponentformat == "power"
    assert fig.data[0].y[-1] == pytest.approx(0.2)
    single = P.spectra_figure({"baseline": {"freqs": [0, 0.25], "power": [1, 0.5]}}, log_y=False)
    assert single.data[0].line.color == fig.data[0].line.color
    bars = P.hf_share_bars(by_run)
    assert [t.name for t in bars.data] == ["baseline", "pooled"] and bars.layout.barmode == "group"
    assert list(bars.data[1].y) == [0.1, 0.1] and list(bars.data[0].x) == ["conv1", "layer1.0.conv1"]


def test_cka_heatmap():
    fig = P.cka_heatmap(["a1", "a2"], ["b1", "b2", "b3"], np.random.rand(2, 3), "CKA", "baseline", "pooled")
    assert len(fig.data) == 1 and isinstance(fig.data[0], go.Heatmap)
    assert fig.data[0].zmin == 0 and fig.data[0].zmax == 1
    assert fig.layout.xaxis.title.text == "pooled layer" and fig.layout.yaxis.title.text == "baseline layer"
    assert list(fig.data[0].y) == ["a1", "a2"]


def test_attribution_grid():
    imgs = np.random.rand(2, 32, 32, 3)
    attrs = {"baseline": np.random.randn(2, 32, 32), "pooled": torch.randn(2, 32, 32)}
    preds = {"baseline": {"class": [1, 2], "confidence": [0.5, 0.9]},
             "pooled": {"class": torch.tensor([1, 0]), "confidence": torch.tensor([0.6, 0.4])}}
    fig = P.attribution_grid(imgs, attrs, preds, classes=["cat", "dog", "ship"], targets=[1, 2])
    assert len(fig.data) == 2 * 3
    assert [type(t).__name__ for t in fig.data[:3]] == ["Image", "Heatmap", "Heatmap"]
    assert [t.name for t in fig.data[:3]] == ["input", "baseline", "pooled"]
    texts = [a.text for a in fig.layout.annotations]
    assert texts[:3] == ["input<br>target<br>dog", "baseline<br>dog<br>50%", "pooled<br>dog<br>60%"]
    assert texts[5] == "cat<br>40%"
    assert fig.layout.coloraxis.cmin == -1  # signed maps: diverging scale
    assert np.abs(np.asarray(fig.data[1].z)).max() == pytest.approx(1.0)
    pos = P.attribution_grid(imgs, {"a": np.random.rand(2, 32, 32)})
    assert pos.layout.coloraxis.cmin == 0 and len(pos.data) == 4
    # larger pictures (a wide screen): each of the two rows 100 px taller than the default's 200
    large = P.attribution_grid(imgs, {"a": np.random.rand(2, 32, 32)}, tile_px=300)
    assert large.layout.height - pos.layout.height == 2 * 100


def test_agreement_heatmap():
    m = np.array([[1.0, 0.4], [0.4, 1.0]])
    fig = P.agreement_heatmap(["a", "b"], m, "spearman")
    assert fig.data[0].zmin == -1 and fig.data[0].colorbar.title.text == "Spearman ρ"
    iou = P.agreement_heatmap(["a", "b"], m, "topk_iou")
    assert iou.data[0].zmin == 0


def test_activation_images_figure():
    fig = P.activation_images_figure(np.random.rand(10, 32, 32, 3), cols=4)
    assert len(fig.data) == 10 and fig.layout.annotations[3].text == "ch 3"
    fig = P.activation_images_figure({"ch 7": np.random.rand(32, 32, 3)})
    assert [t.name for t in fig.data] == ["ch 7"]


def test_planner_caption_names_the_batches_the_peak_was_fitted_over():
    cuda = {"peak_fit": [1e8, 2e6], "peak_fit_batches": [64, 96, 128]}
    assert P.planner_measure([cuda]) == "CUDA max_memory_allocated, fitted over batches 64, 96, 128"
    assert "lower bound" in P.planner_measure([{"peak_fit": None}])


def test_attribution_maps_start_black_not_at_a_streamlit_placeholder():
    """Streamlit repaints #000001-#000040 with its theme's colours: Inferno's #000004 drew zero
    attribution pink, brighter than small values, on a projector. No figure colour may be one."""
    import re

    fig = P.attribution_grid(np.random.rand(1, 8, 8, 3), {"a": np.random.rand(1, 8, 8)},
                             {"a": {"class": [0], "confidence": [0.5]}}, classes=["x"], targets=[0])
    assert fig.layout.coloraxis.colorscale[0][1] == "#000000"
    assert not re.search(r'"#0000(0[1-9]|[1-3][0-9]|40)"', fig.to_json(), re.I)
    from plotly.colors import get_colorscale

    assert P.colorscale("Inferno")[1:] == [list(s) for s in get_colorscale("Inferno")[1:]]  # the rest as it was


def test_attribution_grid_names_each_prediction_with_its_own_models_classes():
    """CIFAR-10 models looking at built-in images: their predictions are CIFAR-10 classes, whatever
    classes the images came with (issue 23: 'coarse_checker 47 %' named a CIFAR output)."""
    imgs = np.random.rand(1, 32, 32, 3)
    preds = {"cifar": {"class": [3], "confidence": [0.47]}}
    fig = P.attribution_grid(imgs, {"cifar": np.random.rand(1, 32, 32)}, preds,
                             classes=["coarse_checker", "fine_checker", "x", "blue_blob"], targets=[3],
                             model_classes={"cifar": ["airplane", "automobile", "bird", "cat"]})
    texts = " ".join(a.text for a in fig.layout.annotations)
    assert "cat<br>47%" in texts and "blue_blob" in texts  # the image's own label names only the target
    assert texts.count("blue_blob") == 1


def test_long_titles_wrap_and_make_room():
    title = "Per-class accuracy, change vs none · CIFAR-10 · 20 ep · s1"
    fig = P.base_layout(go.Figure(), title)
    assert fig.layout.title.text.count("<br>") == 1
    assert all(len(line) <= P.common.TITLE_WIDTH for line in fig.layout.title.text.split("<br>"))
    assert fig.layout.margin.t > P.base_layout(go.Figure(), "Short").layout.margin.t


def _grouped_records():
    a, b = _records(seed=1), _records(seed=2)
    for r in b:  # the second seed a little worse
        if r.get("type") == "eval":
            r["val_acc"] = r["val_acc"] - 0.05
    return {"avg2 · s0": a, "avg2 · s1": b, "none · s0": _records()}


def test_loss_curves_draw_a_setting_as_its_mean_with_a_band():
    runs = _grouped_records()
    fig = P.loss_curves(runs, "val_acc", "epoch", groups={"avg2 (2 seeds)": ["avg2 · s0", "avg2 · s1"],
                                                         "none · s0": ["none · s0"]})
    names = [t.name for t in fig.data if t.showlegend is not False]
    assert names == ["avg2 (2 seeds)", "none · s0"]
    upper, lower, mean = fig.data[:3]
    assert lower.fill == "tonexty" and upper.line.width == 0
    a = dict(zip(*curves.series(runs["avg2 · s0"], "val_acc", "epoch")))
    b = dict(zip(*curves.series(runs["avg2 · s1"], "val_acc", "epoch")))
    assert list(mean.y) == pytest.approx([(a[e] + b[e]) / 2 for e in mean.x])
    assert list(upper.y) == pytest.approx([max(a[e], b[e]) for e in upper.x])
    assert list(lower.y) == pytest.approx([min(a[e], b[e]) for e in lower.x])
    assert mean.line.color == upper.line.color


def test_wall_time_of_different_devices_says_so_on_the_figure():
    runs = {"gpu": _records(), "cpu": _records(seed=1)}
    devices = {"gpu": "NVIDIA H200, bfloat16", "cpu": "CPU, float32"}
    fig = P.loss_curves(runs, "val_acc", "wall", devices=devices)
    assert any("Different devices" in a.text for a in fig.layout.annotations)
    for x in ("step", "epoch"):  # epochs compare across devices: no note
        assert not P.loss_curves(runs, "val_acc", x, devices=devices).layout.annotations
    assert not P.loss_curves(runs, "val_acc", "wall", devices={"gpu": "CPU", "cpu": "CPU"}).layout.annotations


def test_memory_over_training_starts_at_zero_and_shows_cpu_runs():
    """A GPU run's CUDA peak and a CPU run's saved bytes (its only memory record) on one axis from
    zero; the note about CPU runs sits in the room made above the plot, under the title."""
    gpu = [{"type": "step", "step": s, "cuda_peak": 0.4 * 2 ** 30 + s, "saved_bytes": 3e8 if s == 1 else None}
           for s in range(1, 50)]
    cpu = [{"type": "step", "step": s, **({"saved_bytes": 2.4e8} if s == 1 else {})} for s in range(1, 50)]
    fig = P.memory_over_training({"gpu": gpu, "cpu": cpu}, title="Memory over training")
    assert [t.name for t in fig.data] == ["gpu · CUDA peak", "cpu · saved activations"]
    assert list(fig.data[1].x) == [1, 49] and fig.data[1].y[0] == pytest.approx(2.4e8 / 2 ** 20)
    assert fig.layout.yaxis.rangemode == "tozero"
    note = fig.layout.annotations[0]
    lines = note.text.count("<br>") + 1
    assert fig.layout.margin.t >= 80 + 20 * lines  # the title's 80 px, then the note's lines


def test_method_figure_is_two_by_two():
    a = np.random.rand(32, 32)
    fig = P.method_figure(np.random.rand(32, 32, 3), a, a[::2, ::2], a, 2, sizes={"full": 4096, "pooled": 1024})
    domains = sorted({(round(ax.domain[0], 2)) for ax in (fig.layout.yaxis, fig.layout.yaxis3)})
    assert len(fig.data) == 4 and len(domains) == 2  # two rows
    assert fig.layout.xaxis.domain == fig.layout.xaxis3.domain  # two columns


def test_planner_marks_the_largest_batch_the_plan_predicts_and_merges_close_labels():
    from core.analysis.planner import MemoryPlan, largest_batch

    def plan(policy, per_image):
        return MemoryPlan(model="resnet20", policy=policy, size=32, optimizer="sgd", stem="cifar", device="cpu",
                          fit_batches=[4, 8], saved_bytes=[0, 0], saved_fit=(1e6, per_image),
                          model_state={"total": 3e6}, transient_fit=(2e6, 0.5 * per_image))
    plans = [plan("none", 1.5e6), plan("mask", 1.51e6), plan("avg2", 1.6e6), plan("avg2+mask+bn8", 0.5e6)]
    budget = 8 * 2 ** 30
    fig = P.planner_figure(plans, budget)
    diamonds = [t for t in fig.data if t.mode == "markers+text"]
    assert [int(t.x[0]) for t in diamonds] == [largest_batch(p, budget) for p in plans]
    texts = [t.text[0] for t in diamonds if t.text[0]]
    assert len(texts) == 2 and "–" in texts[0]  # none, mask and avg2 within a tenth of the axis: one label
    assert fig.layout.legend.y < 0


def test_legends_and_notes_of_ladder_and_fidelity_bars_do_not_share_the_top():
    ladder = {"model": "resnet20", "batch": 8, "steps": [
        {"policy": p, "total_bytes": 1e6 * (i + 1), "by_kind": {"conv input": 1e6 * (i + 1)}, "cut": 0.1 * i}
        for i, p in enumerate(["none", "avg2", "mask", "avg2+mask", "avg2+mask+bn8", "ckpt"])]}
    fig = P.memory_ladder_figure(ladder)
    assert fig.layout.legend.y < 0 and fig.layout.xaxis.tickangle == 0
    assert "avg2<br>+mask<br>+bn8" in fig.layout.xaxis.ticktext
    res = {"layers": ["conv1", "layer1.0.conv1"], "settings": ["avg2+mask"], "input_rel_error": {"avg2+mask": 1e-7},
           "metrics": {"avg2+mask": {"cosine": [0.9, 0.8], "rel_error": [0.3, 0.4]}}}
    bars = P.fidelity_bars(res, "avg2+mask")
    assert bars.layout.legend.y < 0 and bars.layout.annotations[0].y > 1


def test_selection_colours_keep_each_runs_colour_and_never_repeat_one():
    everything = [f"run{i}" for i in range(18)]  # more runs on disk than colours
    base = P.color_map(everything)
    chosen = everything[:7]
    colours = P.selection_colors(everything, chosen)
    assert len(set(colours.values())) == 7
    kept = [n for n in chosen if colours[n] == base[n]]
    assert len(kept) >= len(set(base[n] for n in chosen))  # only a repeated colour is changed
    assert P.selection_colors(everything, list(reversed(chosen))) == colours


def test_shown_colours_keep_the_chips_and_give_the_others_colours_no_chip_has():
    """A figure of runs beyond the selection (the home page's front of every run) or of part of it
    draws the selected runs in their chips' colours and the rest in other colours."""
    everything = [f"run{i}" for i in range(18)]
    selected = everything[:4]
    chips = P.selection_colors(everything, selected)
    front = everything[2:12]  # two selected runs and eight others: ten runs, ten colours
    colours = P.shown_colors(everything, selected, front)
    assert all(colours[n] == chips[n] for n in front if n in chips)
    rest = [colours[n] for n in front if n not in chips]
    assert not set(rest) & set(chips.values())  # eight others share the six colours no chip has
    assert len(set(rest)) == len(P.PALETTE) - len(selected)
    part = P.shown_colors(everything, selected, selected[1:3])  # some of the selection only
    assert part == {n: chips[n] for n in selected[1:3]}
    crowd = P.shown_colors(everything, selected, everything)  # more runs than colours: shared, none lost
    assert set(crowd) == set(everything) and all(crowd[n] == chips[n] for n in selected)
    assert not {crowd[n] for n in everything[4:]} & set(chips.values())


def test_peak_makers_figure_shows_the_largest_makers_by_pass_and_sums_the_rest():
    mib = 2 ** 20
    groups = [{"made_by": f"aten::op{i} in {'Conv' if i % 2 else 'BNBackward0'}", "tensors": 1, "bytes": (12 - i) * mib}
              for i in range(10)]
    result = {"policy": "avg2+mask+bn8", "peak_bytes": 100 * mib, "saved_bytes": 40 * mib, "at_peak": groups}
    fig = P.peak_makers_figure(result, most=8)
    forward, backward, other = fig.data
    assert (forward.name, backward.name, other.name) == ("made in the forward", "made in the backward",
                                                         "smaller, either pass")
    # the eight largest by pass; the two smallest (op8, op9: 4 + 3 MiB) in one bar
    assert list(backward.y) == ["op0 · BNBackward0", "op2 · BNBackward0", "op4 · BNBackward0", "op6 · BNBackward0"]
    assert list(forward.y) == ["op1 · Conv", "op3 · Conv", "op5 · Conv", "op7 · Conv"]
    assert list(forward.x) == [11, 9, 7, 5] and list(backward.x) == [12, 10, 8, 6]
    assert list(other.y) == ["other (2 ops)"] and list(other.x) == [7]
    assert sum(forward.x) + sum(backward.x) + sum(other.x) == sum(g["bytes"] for g in groups) / mib
    title = fig.layout.title.text.replace("<br>", " ")
    assert "avg2+mask+bn8: 100.0 MiB alive (40.0 MiB saved)" in title
    order = list(fig.layout.yaxis.categoryarray)[::-1]  # top to bottom: by size, "other" last
    assert order == [f"op{i} · {'Conv' if i % 2 else 'BNBackward0'}" for i in range(8)] + ["other (2 ops)"]


def test_recorded_memory_bars_colour_each_run_and_name_no_run_colour_in_the_legend():
    rows = [{"name": "a", "saved_bytes": 2 ** 21, "state_bytes": 2 ** 20, "batch": 8},
            {"name": "b", "saved_bytes": 2 ** 22, "state_bytes": 2 ** 20, "batch": 16}]
    fig = P.run_memory_bars(rows, colors={"a": "#D62728", "b": "#1F77B4"})
    saved, state = fig.data
    assert list(saved.marker.color) == ["#D62728", "#1F77B4"] and list(saved.y) == [2, 4]
    assert saved.showlegend is False and state.name.startswith("model state")  # one swatch, grey
    assert "run's colour" in fig.layout.yaxis.title.text


def test_shown_colours_with_every_palette_colour_on_a_chip_still_colour_the_others():
    everything = [f"run{i}" for i in range(14)]
    crowd = P.shown_colors(everything, everything[:10], everything)
    assert set(crowd) == set(everything) and set(crowd.values()) <= set(P.PALETTE)


def test_keyed_colours_give_a_chips_key_its_colour_and_the_rest_colours_no_chip_has():
    """The planner's policies: one a selected run trained with is drawn in that run's chip colour,
    the others in colours no chip has (avg2+mask had been drawn red beside the red `none` chip)."""
    chips = {"none": "#D62728", "avg2+mask": "#1F77B4"}
    keys = ["none", "ckpt", "avg2+mask", "avg2+mask+bn8", "q2+mask+bn2"]
    colours = P.keyed_colors(keys, chips)
    assert colours["none"] == "#D62728" and colours["avg2+mask"] == "#1F77B4"
    rest = [colours[k] for k in ("ckpt", "avg2+mask+bn8", "q2+mask+bn2")]
    assert len(set(rest)) == 3 and not set(rest) & set(chips.values())
    assert rest == [c for c in P.PALETTE if c not in chips.values()][:3]  # in order: stable as keys are added
    # two keys on one chip colour: the second is not drawn as the first
    shared = P.keyed_colors(["a", "b"], {"a": "#1F77B4", "b": "#1F77B4"})
    assert shared["a"] == "#1F77B4" and shared["b"] != "#1F77B4"
    # more keys than free colours: they share the non-chip ones, never a chip's
    many = P.keyed_colors([f"p{i}" for i in range(12)], {"p0": P.PALETTE[0]})
    assert all(c != P.PALETTE[0] for k, c in many.items() if k != "p0")
