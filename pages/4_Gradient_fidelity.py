"""Gradient fidelity: exact vs compressed weight gradients, per layer, for a run's weights."""

import streamlit as st
import torch

from core.analysis import plots
from core.analysis.fidelity import (
    BIAS_METRICS,
    METRIC_LABELS,
    METRICS,
    FidelityResult,
    compare_gradients,
    sweep_settings,
)
from core.analysis.fidelity_history import fidelity_over_training
from core.engine.runs import run_mtime_key
from core.models import MODEL_MENU, build_model
from ui import common as ui

runs = ui.page("Gradient fidelity", "How close each layer's compressed weight gradient is to the exact one, "
                                    "for a run's weights and a batch of its validation images.")
FAMILIES = ["q8+mask", "q4+mask", "q4+mask+bn4", "q2+mask+bn2", "avg2+res4+mask", "avg2+res2+mask"]
SETTINGS = sweep_settings(ks=(2, 4, 8), pools=("avg", "max"), modes=("upsample", "lowres")) + ["avg2+mask+bn8",
                                                                                                *FAMILIES]
DEFAULT = ["avg2+mask", "avg4+mask", "avg8+mask", "max2+mask", "avg2-lowres+mask", "avg2+mask+bn8", "q4+mask+bn4"]
DRAWS = 8  # of the stochastic families, for their bias (the deterministic ones need one)


@st.cache_data(show_spinner=False, max_entries=16)
def fidelity(path: str, mtime: float, settings: tuple, batch: int, _run) -> tuple[dict, ui.Images]:
    model = ui.model_of(_run, private=True)  # compare_gradients swaps layers: never on the shared copy
    pics = ui.pick_images(_run, batch)
    res = compare_gradients(model, ui.to_input(pics.x, _run), torch.as_tensor(pics.y), settings, fit_stages=True,
                            draws=DRAWS)
    return res.to_dict(), pics


@st.cache_data(show_spinner=False, max_entries=8)
def fidelity_at_init(model_name: str, size: int, settings: tuple, batch: int) -> dict:
    """A model at random init (seed 0) on `batch` smooth random images: no run, no data needed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model(model_name, num_classes=10)
        low = torch.randn(batch, 3, max(size // 8, 1), max(size // 8, 1))
        x = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
        y = torch.randint(0, 10, (batch,))
        return compare_gradients(model, x, y, settings, fit_stages=True).to_dict()


if ui.need_runs(runs, "gradient fidelity"):
    names = ui.names_of(runs)
    by_name = dict(zip(names, runs))
    c1, c2 = st.columns([3, 1])
    name = c1.selectbox("Run", names, key="fid_run")
    run = by_name[name]
    batch = c2.select_slider("Images", [8, 16, 32, 64, 128], 32, key="fid_batch")
    own = str((run.config or {}).get("policy", ""))
    choices = list(dict.fromkeys([*SETTINGS, *([own] if own and own != "none" else [])]))
    settings = st.multiselect("Settings to compare", choices, default=[s for s in DEFAULT if s in choices],
                              key="fid_settings")
    c3, c4 = st.columns([3, 1])
    metric = c3.radio("Measure", METRICS + BIAS_METRICS[:1], horizontal=True, key="fid_metric",
                      format_func=lambda m: plots.FIDELITY_METRIC_LABELS.get(m, METRIC_LABELS.get(m, m)),
                      help=f"bias: how far the mean of {DRAWS} draws of a stochastic family's estimate is from the "
                           "exact gradient; the codes' bias is what their noise explains (unbiased), pooling's is "
                           "its error (the same every time)")
    request = (str(run.path), tuple(settings), int(batch))
    if c4.button("Compute", type="primary", key="fid_go"):
        st.session_state["fid_args"] = request
    args = st.session_state.get("fid_args")
    # the result shows only for the run, settings and images it answers: after the run (or
    # anything else) changed, a heatmap of the previous run would read as this one's
    if args is not None and args != request:
        st.info(f"Press **Compute** for {name} with these settings (the last result was for "
                f"{next((ui.label_of(r) for r in runs if str(r.path) == args[0]), 'another run')}).")
    elif args is None:
        st.info("Pick settings and press **Compute** (a few seconds on a CPU).")
    elif not args[1]:
        st.warning("Pick at least one setting.")
    else:
        target = run
        with ui.guard("Cannot compute the gradients"), st.spinner("Exact and compressed backward passes…"):
            d, pics = fidelity(args[0], run_mtime_key(target), args[1], args[2], target)
            ui.source_note(pics)
            for s, why in d["skipped"].items():
                st.warning(f"{s} left out: {why}")
            for s, note in d["notes"].items():
                st.caption(f"{s}: {note}")
            if metric in BIAS_METRICS:
                floor = {s: FidelityResult.from_dict(d).mean("bias_floor", compressed_only=True)[s]
                         for s in d["settings"]}
                st.caption("Mean bias floor (what the noise of the draws explains): " + ", ".join(
                    f"{s} {v:.3f}" for s, v in floor.items() if v is not None) + ". Bias near its floor: unbiased.")
            ui.show(plots.fidelity_heatmap(d, metric, title=f"{ui.label_of(target)} · {d['batch']} images"),
                    "fidelity-heatmap",
                    "Each cell compares one layer's weight gradient under one setting with the exact gradient "
                    "(cosine 1 and error 0 mean identical); the input side is at the top.")
            if d["settings"]:
                one = st.selectbox("One setting, layer by layer", d["settings"], key="fid_one")
                ui.show(plots.fidelity_bars(d, one), "fidelity-bars",
                        "Cosine (direction) and relative error (size of the mistake) for every layer.")
            rows = FidelityResult.from_dict(d).to_rows()
            ui.download_csv(rows, "gradient-fidelity.csv")

    st.header("Over training")
    histories = {n: fidelity_over_training(ui.metrics_of(r)) for n, r in zip(names, runs)}
    histories = {n: h for n, h in histories.items() if len(h)}
    tmetric = st.radio("Measure", ["cosine", "rel_error"], format_func=plots.FIDELITY_METRIC_LABELS.get,
                       horizontal=True, key="fid_hist_metric")
    if not histories:
        st.info("The selected runs recorded no fidelity during training (exact policies record none).")
    else:
        if name in histories:
            ui.show(plots.fidelity_over_training_figure(histories[name], tmetric, title=name), "fidelity-training",
                    "The run's own compressed gradient against the exact one, measured every few hundred steps; "
                    "thin lines are layers, the thick line their mean.")
        ui.show(plots.fidelity_over_training_figure(histories, tmetric, colors=ui.colors_for(runs),
                                                    title="Mean over layers, all selected runs"),
                "fidelity-training-runs", "One line per run: the layer mean of the measure above.")

st.header("Any model, at random init")
st.caption("No run needed: a model at random init on smooth random images, e.g. one of torchvision's CNNs at "
           "224 px (weights are never downloaded).")
a1, a2, a3, a4 = st.columns([3, 1, 1, 1])
any_model = a1.selectbox("Model", MODEL_MENU, index=MODEL_MENU.index("torchvision:mobilenet_v2"), key="fid_any_model")
any_size = a2.select_slider("Image size", [32, 64, 128, 224], 64, key="fid_any_size")
any_batch = a3.select_slider("Images", [4, 8, 16], 8, key="fid_any_batch")
any_settings = st.multiselect("Settings", SETTINGS, default=["avg2+mask+bn8", "q4+mask+bn4", "q2+mask+bn2"],
                              key="fid_any_settings")
if a4.button("Compute", key="fid_any_go"):
    st.session_state["fid_any_args"] = (any_model, int(any_size), tuple(any_settings), int(any_batch))
if (any_args := st.session_state.get("fid_any_args")) is not None and any_args[2]:
    with ui.guard("Cannot compute the gradients"), st.spinner("Exact and compressed backward passes…"):
        d = fidelity_at_init(*any_args)
        for s, why in d["skipped"].items():
            st.warning(f"{s} left out: {why}")
        ui.show(plots.fidelity_heatmap(d, "cosine", title=f"{any_args[0]} at init · {any_args[1]} px"),
                "fidelity-any-model", "Cosine of each conv's compressed weight gradient with the exact one.")
