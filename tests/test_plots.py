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
    assert [t.name for t in fig.data] == ["baseline", "avg2+mask"]
    assert fig.layout.yaxis.title.text == "epochs"
    assert "empty" in fig.layout.annotations[0].text


def test_wrapped_tick_labels_break_long_paths_and_keep_every_character():
    name = "none · imagefolder:.data/cifar10-jpeg/train · 30 ep"
    fig = P.time_to_accuracy_bars([{"run": name, "epochs_to_0.5": 3}], 0.5)
    lines = fig.layout.xaxis.ticktext[0].split("<br>")
    assert max(len(line) for line in lines) <= 14  # every word here has a break point within 14
    assert lines[0] == "none" and lines[-1] == "30 ep"
    # nothing is lost: the lines hold the run name's characters, less its separators and spaces
    assert "".join(lines).replace(" ", "") == name.replace(" · ", "").replace(" ", "")
    assert P.time_to_accuracy_bars([{"run": "short", "epochs_to_0.5": 3}], 0.5).layout.xaxis.ticktext == ("short",)
    # more bars, narrower labels: four share the width one had
    four = [{"run": f"avg{k}+mask · cifar10-jpeg/train", "epochs_to_0.5": k} for k in (1, 2, 4, 8)]
    ticks = P.time_to_accuracy_bars(four, 0.5).layout.xaxis.ticktext
    assert ticks[0].split("<br>") == ["avg1+mask", "cifar10-", "jpeg/", "train"]


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
    # a second run of a policy, less accurate, at the same memory: its label would cover the first's
    fig = P.pareto_scatter(rows + [{"name": "pooled, shorter", "policy": "avg2+mask", "acc": 0.88,
                                    "memory": 200 * 2 ** 20}])
    assert [t.text[0] for t in fig.data[:4]] == ["none", "avg2+mask", "max4", ""]
    # another policy of the same bytes, less accurate: its label goes under its marker
    fig = P.pareto_scatter(rows + [{"name": "max-pooled", "policy": "max2+mask", "acc": 0.89,
                                    "memory": 200 * 2 ** 20}])
    assert [(t.text[0], t.textposition) for t in fig.data[:4]] == [
        ("none", "top center"), ("avg2+mask", "top center"), ("max4", "top center"), ("max2+mask", "bottom center")]
    # three policies in that column: the one in the middle has its label beside its marker
    fig = P.pareto_scatter(rows + [{"name": "low-res", "policy": "avg2-lowres+mask", "acc": 0.885,
                                    "memory": 200 * 2 ** 20},
                                   {"name": "max-pooled", "policy": "max2+mask", "acc": 0.89, "memory": 200 * 2 ** 20}])
    assert [(t.text[0], t.textposition) for t in fig.data[1:5]] == [
        ("avg2+mask", "top center"), ("max4", "top center"), ("avg2-lowres+mask", "bottom center"),
        ("max2+mask", "middle right")]


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
    assert texts[:3] == ["input<br>target dog", "baseline<br>dog 50%", "pooled<br>dog 60%"]
    assert texts[5] == "cat 40%"
    assert fig.layout.coloraxis.cmin == -1  # signed maps: diverging scale
    assert np.abs(np.asarray(fig.data[1].z)).max() == pytest.approx(1.0)
    pos = P.attribution_grid(imgs, {"a": np.random.rand(2, 32, 32)})
    assert pos.layout.coloraxis.cmin == 0 and len(pos.data) == 4


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
