"""Filters & features: what the networks learned, side by side (filters, spectra, activation
maximisation, CKA between two runs)."""

import streamlit as st
import torch

from core.analysis import activation_max, filters, plots
from core.analysis.cka import cka_matrix
from core.analysis.images import to_pixels
from core.analysis.layers import feature_maps, first_conv, layer_names
from core.engine.runs import run_mtime_key
from ui import common as ui

runs = ui.page("Filters & features", "What the selected networks learned: their filters, how much fine detail "
                                     "the filters hold, images that excite a channel, and how alike two runs are.")


@st.cache_data(show_spinner=False, max_entries=32)
def spectra(path: str, mtime: float, _run) -> list[dict]:
    return filters.layer_spectra(ui.model_of(_run))


@st.cache_data(show_spinner=False, max_entries=32)
def dream(path: str, mtime: float, layer: str, channels: tuple, steps: int, _run):
    cfg = _run.config or {}
    size = cfg.get("image_size") if isinstance(cfg.get("image_size"), int) else 32
    return activation_max.maximize_activations(ui.model_of(_run, private=True), layer, list(channels), steps=steps,
                                         mean=cfg.get("mean"), std=cfg.get("std"), size=size)


@st.cache_data(show_spinner=False, max_entries=64)
def channels_at(path: str, mtime: float, layer: str, _run) -> int:
    """Channels of a block's output: one forward of a small blank image, hooked, so on a private
    copy of the shared model; once per run and layer."""
    return feature_maps(ui.model_of(_run, private=True), layer, torch.zeros(1, 3, 16, 16)).shape[1]


@st.cache_data(show_spinner=False, max_entries=16)
def cka(path_a: str, mtime_a: float, path_b: str, mtime_b: float, n: int, _a, _b):
    pics = ui.pick_images(_a, n)
    # each model normalises the shared pixels its own way (PixelInput); its layers are "net.<name>"
    la = ["net." + n for n in layer_names(ui.model_of(_a), "block")]
    lb = ["net." + n for n in layer_names(ui.model_of(_b), "block")]
    names_a, names_b, m = cka_matrix(ui.pixel_model(_a), ui.pixel_model(_b), to_pixels(pics.x), la, lb)
    return [n[4:] for n in names_a], [n[4:] for n in names_b], m, pics


if ui.need_runs(runs, "filters"):
    shown = runs[:4]
    if len(runs) > 4:
        st.caption("The first four selected runs are shown.")
    names = ui.names_of(shown)
    colors = ui.colors_for(shown)
    models = {}
    for n, r in zip(names, shown):
        with ui.guard(n, warn=True):
            models[n] = ui.model_of(r)
    by_name = dict(zip(names, shown))

    st.header("First-layer filters")
    norm = st.radio("Contrast", ["per_filter", "global"], horizontal=True, key="ff_norm",
                    format_func={"per_filter": "each filter stretched", "global": "one scale for all"}.get)
    if models:
        with ui.guard("Cannot draw the filters"):
            grids = {n: filters.filter_grid(m.get_submodule(first_conv(m)).weight, norm, scale=6)
                     for n, m in models.items()}
            ui.show(plots.filter_grid_figure(grids, colors=colors), "first-layer-filters",
                    "Every tile is one 3×3 colour filter of the first layer; smoother tiles hold less fine detail.")
        if st.toggle("Show a deeper layer", key="ff_deeper"):
            first = next(iter(models.values()))
            convs = [c for c in layer_names(first, "conv") if c != first_conv(first)]
            deep = st.selectbox("Layer", convs, key="ff_layer")
            with ui.guard("Cannot draw that layer"):
                grids = {n: filters.channel_grid(m.get_submodule(deep).weight, 8, 16, norm, scale=6)
                         for n, m in models.items()}
                ui.show(plots.filter_grid_figure(grids, colors=colors), "deep-filters",
                        f"Rows: the first 8 filters of {deep}; columns: their kernels for the first 16 input channels.")

        st.header("Filter spectra")
        if st.button("Compute spectra", key="ff_spec_go", help="A few seconds per run on a CPU; kept afterwards"):
            st.session_state["ff_spectra"] = True
        if not st.session_state.get("ff_spectra"):
            st.caption("How much fine detail each layer's filters hold: press **Compute spectra**.")
        else:
            with ui.guard("Cannot compute the spectra"), st.spinner("Fourier transforms of every filter…"):
                specs = {n: spectra(str(by_name[n].path), run_mtime_key(by_name[n]), by_name[n]) for n in models}
                layers = [e["name"] for e in next(iter(specs.values()))]
                layer = st.selectbox("Layer", layers, key="ff_spec_layer")
                ui.show(plots.spectra_figure(specs, layer, colors=colors, title=f"Spectrum · {layer}"), "spectra",
                        "How the layer's filter energy spreads over spatial frequency: each point a ring's share, "
                        "so the points right of ½ Nyquist add up to the layer's bar below. That is fine detail "
                        "pooling hides from the gradient; past Nyquist lie the diagonal frequencies (a "
                        "checkerboard sits at 0.71).")
                ui.show(plots.hf_share_bars(specs, colors=colors, title="Share of fine detail per layer"),
                        "hf-share", "Filter energy above half the Nyquist frequency, layer by layer.")

        st.header("What excites a channel")
        c1, c2, c3 = st.columns([2, 2, 3])
        who = c1.selectbox("Run", list(models), key="ff_am_run")
        blocks = [*layer_names(models[who], "block"), "fc"]
        am_layer = c2.selectbox("Layer", blocks, index=len(blocks) - 2, key="ff_am_layer")
        with ui.guard("Cannot read that layer"):
            run = by_name[who]
            n_ch = (models[who].fc.out_features if am_layer == "fc" else
                    channels_at(str(run.path), run_mtime_key(run), am_layer, run))
            chans = c3.multiselect("Channels", list(range(n_ch)), default=list(range(min(4, n_ch))), key="ff_am_ch",
                                   max_selections=16)
            steps = st.select_slider("Optimisation steps", [32, 64, 128, 256], 64, key="ff_am_steps")
            if st.button("Generate images", key="ff_am_go") and chans:
                st.session_state["ff_am_args"] = (who, am_layer, tuple(chans), steps)
            args = st.session_state.get("ff_am_args")
            if args and args[0] in by_name:
                with st.spinner("Optimising images…"):
                    r = by_name[args[0]]
                    imgs = dream(str(r.path), run_mtime_key(r), args[1], args[2], args[3], r)
                ui.show(plots.activation_images_figure(imgs, [f"ch {c}" for c in args[2]],
                                                       title=f"{args[0]} · {args[1]}"), "activation-maximisation",
                        "Each picture was optimised, starting from noise, to make one channel respond as strongly "
                        "as possible.")

    st.header("How alike are two runs? (CKA)")
    if len(runs) < 2:
        st.info("Select two runs in the sidebar to compare their layers.")
    else:
        all_names = ui.names_of(runs)
        by_all = dict(zip(all_names, runs))
        c1, c2, c3 = st.columns([2, 2, 1])
        a = c1.selectbox("Run A", all_names, 0, key="ff_cka_a")
        b = c2.selectbox("Run B", all_names, 1, key="ff_cka_b")
        n_img = c3.select_slider("Images", [64, 128, 256], 128, key="ff_cka_n")
        if st.button("Compare", key="ff_cka_go"):
            st.session_state["ff_cka_args"] = (a, b, n_img)
        args = st.session_state.get("ff_cka_args")
        if args and args[0] in by_all and args[1] in by_all:
            ra, rb = by_all[args[0]], by_all[args[1]]
            with ui.guard("Cannot compare"), st.spinner("Running both models on the same images…"):
                na, nb, m, pics = cka(str(ra.path), run_mtime_key(ra), str(rb.path), run_mtime_key(rb), args[2],
                                      ra, rb)
                ui.source_note(pics)
                ui.show(plots.cka_heatmap(na, nb, m, label_a="A", label_b="B", title=f"A: {args[0]}<br>B: {args[1]}"),
                        "cka", "Similarity of every layer of run A to every layer of run B on the same images "
                               "(1 = the same representation up to rotation and scale).")
