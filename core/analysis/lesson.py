"""The Lesson page's path through the method, for a class: eight steps, each one idea with one
figure from the app's own views, built offline from the shipped runs (checkpoints/) and the
shipped CIFAR-10 images, in a second or so on a CPU. Each step says in two or three plain
sentences what to notice (with numbers read from the runs where they can be) and names the full
page for the curious.

`build(key, runs)` -> (figure, text); `STEPS` lists them in order. A step that needs a shipped
run which is not there raises LessonError (one line: which run).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import statistics
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..engine.data.samples import shipped_cifar10
from ..engine.runs import Run, list_runs, load_model, read_metrics
from ..engine.runs.paths import SHIPPED_DIR
from . import plots
from .bench import TRAINING_STEP_TIME
from .fidelity_history import fidelity_over_training
from .filters import filter_grid, high_frequency_share
from .images import PixelInput, run_stats, to_display, to_input, to_pixels
from .layers import first_conv
from .memory_ladder import memory_ladder
from .method_picture import method_picture
from .reproduction import trained_on
from .run_groups import data_name, group_settings, run_names
from .run_views import default_selection, pareto_setting_rows


class LessonError(ValueError):
    """A step cannot be built here (a shipped run is missing); the message says which, in one line."""


@dataclass(frozen=True)
class Step:
    key: str
    title: str
    page: str  # the full view, for the link
    link: str  # what the link says


STEPS = (
    Step("keeps", "What a layer keeps for backward", "pages/0_Home.py",
         "Home: the method in one picture, for any layer, image and K"),
    Step("catch", "Why pooling alone costs memory", "pages/3_Memory.py",
         "Memory: the ladder, measured for any model and batch"),
    Step("ladder", "The ladder", "pages/3_Memory.py", "Memory: the ladder with your own policies"),
    Step("gradients", "How close the compressed gradients are", "pages/4_Gradient_fidelity.py",
         "Gradient fidelity: layer by layer, for any run and setting"),
    Step("cost", "What it costs: accuracy and time", "pages/2_Loss_curves.py",
         "Loss curves: the runs over time, epochs to an accuracy, per class"),
    Step("filters", "What the pooled models learned", "pages/5_Filters_and_features.py",
         "Filters & features: spectra, deeper layers, CKA"),
    Step("attributions", "Where the pooled models look", "pages/6_Attributions.py",
         "Attributions: other methods, images and runs, or your own image"),
    Step("checkpointing", "Against gradient checkpointing", "pages/3_Memory.py",
         "Memory: the ladder beside checkpointing, and the planner"),
)
LAYER = "layer1.0.conv2"  # a conv whose input is a ReLU output: the catch shows there
IMAGE_CLASS = "ship"  # the picture's image: a shape that reads at 32x32
EPOCHS = 20
LADDER = ("none", "avg2", "mask", "avg2+mask", "avg2+mask+bn8")
MEASURED = (*LADDER, "ckpt")  # one measurement for the three steps about memory
VERSUS_CKPT = ("none", "avg2+mask", "avg2+mask+bn8", "ckpt")
COMPRESSED = ("avg2+mask", "max2+mask", "avg2-lowres+mask", "avg4+mask", "avg8+mask")
PICTURED = ("none", "avg2+mask", "avg4+mask", "avg8+mask")


def shipped_runs() -> list[Run]:
    """The runs the lesson is built from: the finished runs of checkpoints/."""
    return [r for r in list_runs([SHIPPED_DIR], include_default=False) if r.ok]


def _cifar(runs: Sequence[Run], epochs: int | None = EPOCHS) -> list[Run]:
    return [r for r in runs if data_name(r.config or {}) == "CIFAR-10"
            and (epochs is None or (r.config or {}).get("epochs") == epochs)]


def pick(runs: Sequence[Run], policy: str, epochs: int = EPOCHS) -> Run:
    """The shipped CIFAR-10 run of `policy` and schedule the lesson shows: trained on the device
    most of them used (the CPU), then the lowest seed."""
    cands = [r for r in _cifar(runs, epochs) if (r.config or {}).get("policy") == policy]
    if not cands:
        raise LessonError(f"this step needs the shipped CIFAR-10 run {policy} · {epochs} ep (checkpoints/)")
    devices = [trained_on(r.config or {}) for r in _cifar(runs, epochs)]
    usual = max(sorted(set(devices)), key=devices.count)
    return min(cands, key=lambda r: (trained_on(r.config or {}) != usual, (r.config or {}).get("seed", 0), r.name))


def run_colors(runs: Sequence[Run], chosen: dict[str, Run]) -> dict[str, str]:
    """Label -> its run's colour, the same in every step: the runs the app selects at first start
    keep their chips' colours (plots.shown_colors, as ui.picker), and every run the lesson shows
    (pick's run of each 20-epoch policy) is placed once, so a run has one colour on every step."""
    cast = {pick(runs, p).name for p in {(r.config or {}).get("policy") for r in _cifar(runs)}}
    first_start = [Path(p).name for p in default_selection(list(runs))]
    cmap = plots.shown_colors([r.name for r in runs], first_start, sorted(cast | {r.name for r in chosen.values()}))
    return {label: cmap[r.name] for label, r in chosen.items()}


@functools.lru_cache(maxsize=4)
def scaled_ladder(policies: tuple[str, ...], batch: int = 128, model: str = "resnet20") -> dict:
    """memory_ladder(model, batch) as a dict, from two measurements at batches 1 and 2: saved
    bytes are exactly affine in the batch (tests/test_lesson.py checks it), and two tiny forward
    passes take a fraction of a second where one at batch 128 takes seconds on a busy CPU.
    Cached: three steps read one measurement (the first pays for ckpt's first call, ~1 s)."""
    one, two = (memory_ladder(model, b, policies=policies, time_steps=False).to_dict() for b in (1, 2))

    def at(v1: float, v2: float) -> int:
        return int(round(v1 + (v2 - v1) * (batch - 1)))

    steps = []
    for s1, s2 in zip(one["steps"], two["steps"]):
        kinds = sorted(set(s1["by_kind"]) | set(s2["by_kind"]))
        steps.append({**s1, "total_bytes": at(s1["total_bytes"], s2["total_bytes"]), "by_layer": {},
                      "by_layer_kind": {}, "by_kind": {k: at(s1["by_kind"].get(k, 0), s2["by_kind"].get(k, 0))
                                                       for k in kinds}})
    base = next(s["total_bytes"] for s in steps if s["policy"] == "none")
    for s in steps:
        s["cut"] = 1.0 - s["total_bytes"] / base
    return {**one, "batch": batch, "steps": steps}


def ladder_part(ladder: dict, policies: Sequence[str]) -> dict:
    return {**ladder, "steps": [s for s in ladder["steps"] if s["policy"] in policies]}


def _cut(ladder: dict, policy: str) -> float:
    return next(s["cut"] for s in ladder["steps"] if s["policy"] == policy)


def _picture(runs: Sequence[Run]) -> dict:
    """The method picture of the baseline at LAYER for one shipped ship image, its most varied channel."""
    run = pick(runs, "none")
    x, y, classes = shipped_cifar10(10)
    i = int(np.flatnonzero(y == classes.index(IMAGE_CLASS))[0])
    model = load_model(run.path)
    batch = to_input(x[i:i + 1], run.config)
    seen: dict = {}
    handle = model.get_submodule(LAYER).register_forward_pre_hook(lambda _m, a: seen.__setitem__("x", a[0]))
    try:
        with torch.no_grad():
            model(batch)
    finally:
        handle.remove()
    channel = int(seen["x"][0].flatten(1).std(1).argmax())  # the channel with the most to show
    pic = method_picture(model, LAYER, batch, 2, "avg", channel)
    return {**pic, "image": to_display(x[i:i + 1])[0], "class": IMAGE_CLASS}


def _keeps(runs):
    pic = _picture(runs)
    b = pic["bytes"]
    fig = plots.method_figure(pic["image"], pic["activation"], pic["pooled"], pic["restored"], 2, "avg", LAYER,
                              pic["channel"], b, title=f"A {pic['class']}, one channel of {LAYER}")
    text = (f"While a network trains, every layer keeps its input until the backward pass needs it: here "
            f"{b['full'] // 1024} KiB per image for one layer of a ResNet-20 (top right, one of its "
            f"{pic['shape'][0]} channels). A compressed layer keeps only the 2×2 averages, a quarter of that "
            "(bottom left), and computes its weight gradient from the blocky copy it gets back (bottom right). "
            "The forward pass is unchanged, and the gradient it passes to earlier layers stays exact.")
    return fig, text


def _catch(runs):
    b = _picture(runs)["bytes"]
    full, pooled, mask = b["full"], b["pooled"], b["mask"]
    items = {"none: the full input": full, "avg2: + a pooled copy": full + pooled,
             "mask: + a 1-bit ReLU mask": full + mask, "avg2+mask: pooled copy + mask": pooled + mask}
    fig = plots.bytes_bars(items, title=f"What {LAYER} and its ReLU keep", x_title="bytes per image")
    whole = scaled_ladder(MEASURED)
    text = ("In a ResNet the ReLU before a convolution keeps the same full-size tensor for its own backward "
            "pass, so pooling the convolution's input alone adds a copy: the layer keeps more, not less. Only "
            "when the ReLU keeps just a 1-bit mask of where its input was positive (exact, 1/32 of the size) "
            f"can the full tensor go. Over the whole network, avg2 alone keeps {-100 * _cut(whole, 'avg2'):.0f} % "
            f"more than none; avg2+mask keeps {100 * _cut(whole, 'avg2+mask'):.0f} % less.")
    return fig, text


def _ladder(runs):
    lad = scaled_ladder(MEASURED)
    fig = plots.memory_ladder_figure(ladder_part(lad, LADDER), title="Saved activations, ResNet-20, batch 128")
    text = (f"Down the ladder for the whole ResNet-20 at batch 128: pooled inputs with ReLU masks keep "
            f"{100 * _cut(lad, 'avg2+mask'):.0f} % less than none, and keeping BatchNorm's input in 8 bits as "
            f"well (avg2+mask+bn8) {100 * _cut(lad, 'avg2+mask+bn8'):.0f} % less. The colours say what keeps "
            "the bytes: once the convolutions' inputs are pooled, BatchNorm's full-size input is most of what is "
            "left.")
    return fig, text


def _mean_cosine(run: Run) -> float:
    hist = fidelity_over_training(read_metrics(run.path))
    vals = [v for v in hist.mean("cosine") if v is not None]
    if not vals:
        raise LessonError(f"the shipped run {run.name} recorded no gradient fidelity")
    return statistics.fmean(vals)


def _gradients(runs):
    chosen = [pick(runs, p) for p in COMPRESSED]
    histories = {(r.config or {}).get("policy"): fidelity_over_training(read_metrics(r.path)) for r in chosen}
    fig = plots.fidelity_over_training_figure(
        histories, "cosine", title="Compressed vs exact weight gradient, while training",
        colors=run_colors(runs, {(r.config or {}).get("policy"): r for r in chosen}))
    cos = {(r.config or {}).get("policy"): _mean_cosine(r) for r in chosen}
    text = (f"How far the estimated weight gradient is from the exact one, measured while the runs trained: a "
            f"cosine of 1 means the same direction. It averages {cos['avg2+mask']:.2f} for avg2+mask, "
            f"{cos['avg4+mask']:.2f} for avg4+mask and {cos['avg8+mask']:.2f} for avg8+mask; the maximum of a "
            f"block (max2+mask, {cos['max2+mask']:.2f}) is a worse summary than its average. Since every layer "
            "passes back an exact input gradient, these errors do not add up through the network's depth.")
    return fig, text


def _cost(runs):
    cifar = _cifar(runs)
    settings = group_settings(cifar, run_names(cifar))
    rows = pareto_setting_rows(settings)
    fig = plots.pareto_scatter(rows, "saved activations per training image",
                               title=f"Accuracy vs memory, CIFAR-10, {EPOCHS} epochs",
                               colors=run_colors(runs, {s.label: pick(runs, s.runs[0].config["policy"])
                                                        for s in settings}))
    acc = {r["policy"]: r["acc"] for r in rows}
    mem = {r["policy"]: r["memory"] for r in rows}
    longer = [r for r in _cifar(runs, 30) if (r.config or {}).get("policy") == "avg2+mask"]
    more = (f" Trained 30 epochs instead of 20, avg2+mask reaches {100 * longer[0].summary['last_val_acc']:.1f} %."
            if longer else "")
    text = (f"Against the baseline, avg2+mask keeps {100 * (1 - mem['avg2+mask'] / mem['none']):.0f} % fewer bytes "
            f"and ends {100 * (acc['none'] - acc['avg2+mask']):.1f} points lower ({100 * acc['avg2+mask']:.1f} % "
            f"against {100 * acc['none']:.1f} %, means of the seeds; the bars span them); with BatchNorm in 8 bits "
            f"it keeps {100 * (1 - mem['avg2+mask+bn8'] / mem['none']):.0f} % fewer at "
            f"{100 * acc['avg2+mask+bn8']:.1f} %, and K = 4 costs {100 * (acc['none'] - acc['avg4+mask']):.1f} "
            f"points.{more} Each compressed step also takes a little longer: "
            f"{TRAINING_STEP_TIME['avg2+mask']:.2f} times a baseline step "
            f"({TRAINING_STEP_TIME['avg2+mask+bn8']:.2f} with BatchNorm in 8 bits) in a training run on a CPU.")
    return fig, text


def _filters(runs):
    chosen = [pick(runs, p) for p in PICTURED]
    grids, hf = {}, {}
    for r in chosen:
        model = load_model(r.path)
        w = model.get_submodule(first_conv(model)).weight
        pol = (r.config or {}).get("policy")
        grids[pol] = filter_grid(w, "per_filter", scale=6)
        hf[pol] = high_frequency_share(w)
    fig = plots.filter_grid_figure(grids, title="First-layer filters",
                                   colors=run_colors(runs, {(r.config or {}).get("policy"): r for r in chosen}))
    text = ("Each tile is one of the first layer's 3×3 colour filters. Pooling hides detail finer than K pixels "
            "from the weight gradient, so one might expect smoother filters; yet the share of filter energy in "
            "fine detail hardly moves (" + ", ".join(f"{p} {v:.2f}" for p, v in hf.items()) + "), and by eye the "
            "four sets of colour and edge detectors are hard to tell apart.")
    return fig, text


def _attributions(runs):
    from .attribution import agreement_matrix, compare_models

    chosen = [pick(runs, p) for p in ("none", "avg2+mask", "avg4+mask")]
    models = {(r.config or {}).get("policy"): PixelInput(load_model(r.path), *run_stats(r.config)) for r in chosen}
    # three images the baseline gets right: a first picture every model gets wrong (an airplane
    # all three called a ship) asked a class what the maps of a wrong answer mean
    x, y, classes = shipped_cifar10(30, seed=1)
    with torch.no_grad():
        right = (models["none"](to_pixels(x)).argmax(1) == torch.as_tensor(y)).nonzero().flatten()[:3].numpy()
    x, y = x[right], y[right]
    res = compare_models(models, to_pixels(x), "gradcam", targets=torch.as_tensor(y))
    fig = plots.attribution_grid(to_display(x), {n: a.numpy() for n, a in res["attributions"].items()},
                                 {n: {"class": p["class"].numpy(), "confidence": p["confidence"].numpy()}
                                  for n, p in res["predictions"].items()}, classes, res["targets"].numpy(),
                                 title="Grad-CAM: where each model looks",
                                 colors=run_colors(runs, {(r.config or {}).get("policy"): r for r in chosen}))
    names, m = agreement_matrix(res, "spearman")
    rho = m[names.index("none"), names.index("avg2+mask")]
    text = ("Grad-CAM marks the parts of an image a model's decision for the true class rests on (bright = "
            "more), here on three images the baseline classifies correctly. The pooled models look at the same "
            "objects as the baseline: on these images the maps of none "
            f"and avg2+mask agree with a rank correlation of {rho:.2f} (1 = the same order of importance); the "
            "titles give each model's prediction and confidence.")
    return fig, text


def _checkpointing(runs):
    lad = scaled_ladder(MEASURED)
    fig = plots.memory_ladder_figure(ladder_part(lad, VERSUS_CKPT), title="Saved activations beside checkpointing")
    text = (f"Gradient checkpointing keeps only each block's input and computes the rest again during the "
            f"backward pass: exact gradients and {100 * _cut(lad, 'ckpt'):.0f} % fewer saved bytes, for a second "
            f"forward pass ({TRAINING_STEP_TIME['ckpt']:.2f} times a baseline step in a training run on a CPU). "
            f"avg2+mask+bn8 keeps even less ({100 * _cut(lad, 'avg2+mask+bn8'):.0f} % fewer) for "
            f"{TRAINING_STEP_TIME['avg2+mask+bn8']:.2f} times, but its gradients are approximate. Newer "
            "families (conv inputs in a few bits, qB; a pooled copy plus a low-bit residual, avgK+resB; BatchNorm "
            "in 4 or 2 bits) are on the Memory page.")
    return fig, text


_warming: list[threading.Thread] = []


def _prepare() -> None:
    scaled_ladder(MEASURED)
    with contextlib.suppress(ImportError):  # the attributions step's library, slow to import
        importlib.import_module("captum.attr")


def warm_up() -> None:
    """Start, once per process, a background thread that measures the memory steps' ladder and
    imports Captum: ckpt's first call imports part of torch (about a second), which the second
    step would otherwise keep a class waiting for while the first is on screen."""
    if not _warming:
        _warming.append(threading.Thread(target=_prepare, daemon=True, name="lesson-warm-up"))
        _warming[0].start()


BUILDERS = {"keeps": _keeps, "catch": _catch, "ladder": _ladder, "gradients": _gradients, "cost": _cost,
            "filters": _filters, "attributions": _attributions, "checkpointing": _checkpointing}


def build(key: str, runs: Sequence[Run] | None = None):
    """(plotly figure, two or three sentences) of the step `key`, from `runs` (default: the
    shipped ones)."""
    if key not in BUILDERS:
        raise KeyError(f"no lesson step {key!r}; steps: {', '.join(BUILDERS)}")
    return BUILDERS[key](list(runs) if runs is not None else shipped_runs())
