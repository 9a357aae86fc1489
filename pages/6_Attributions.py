"""Attributions: which pixels each model's decision rests on (Captum), and how much the runs agree."""

import numpy as np
import streamlit as st

from core.analysis import plots
from core.analysis.images import UploadError, image_from_upload, to_display, to_pixels
from core.engine.runs import run_mtime_key
from ui import common as ui

runs = ui.page("Attributions", "Which pixels each model's decision rests on, for the same images, and how much "
                               "the models agree.")
# core.analysis.attribution.METHODS, with names for people (captum is imported only when needed: it is slow to load)
METHODS = {"saliency": "Saliency", "integrated_gradients": "Integrated Gradients", "gradient_shap": "GradientShap",
           "gradcam": "Grad-CAM", "occlusion": "Occlusion"}
SOURCES = ["run's validation images", "built-in set", "upload an image"]
LARGE_TILE_PX = 220  # "Large pictures": fits five columns across a 1440 px screen


@st.cache_data(show_spinner=False, max_entries=16)
def explain(keys: tuple, images: np.ndarray, targets: tuple | None, method: str, _runs):
    """compare_models on the runs for one batch of pixels, as numpy for the figures."""
    import torch

    from core.analysis.attribution import agreement_matrix, compare_models

    # every model gets its own normalisation (PixelInput); the baseline is the first run's mean colour
    models = {k[0]: ui.pixel_model(r) for k, r in zip(keys, _runs)}
    x = to_pixels(images)
    res = compare_models(models, x, method, targets=None if targets is None else torch.tensor(targets),
                         baseline=ui.mean_image(_runs[0], x))
    out = {"names": res["names"], "targets": res["targets"].numpy(),
           "maps": {n: a.numpy() for n, a in res["attributions"].items()},
           "predictions": {n: {"class": p["class"].numpy(), "confidence": p["confidence"].numpy()}
                           for n, p in res["predictions"].items()},
           "agreement": {}, "pairs": []}
    if len(models) > 1:
        for metric in ("spearman", "topk_iou"):
            out["agreement"][metric] = agreement_matrix(res, metric)
        out["pairs"] = [{"run A": a, "run B": b, "image": i, "spearman": float(v["spearman"][i]),
                         "top-10% IoU": float(v["topk_iou"][i])}
                        for (a, b), v in res["agreement"].items() for i in range(len(v["spearman"]))]
    return out


if ui.need_runs(runs, "attributions"):
    names = ui.names_of(runs)
    first = runs[0]
    # Only runs that know the same classes as the first one can explain the same targets.
    alike = [(n, r) for n, r in zip(names, runs)
             if (r.config or {}).get("classes") == (first.config or {}).get("classes")]
    other = [n for n in names if n not in {a[0] for a in alike}]
    same = alike[:4]
    if other:
        st.warning("Left out, trained on other classes than the first run: " + ", ".join(other))
    if len(alike) > 4:
        st.caption("Attributions compare up to four runs: the first four selected are shown.")

    c1, c2, c3, c4 = st.columns([3, 2, 1, 1])
    source = c1.radio("Images", SOURCES, horizontal=True, key="att_source")
    method = c2.selectbox("Method", list(METHODS), format_func=METHODS.get, key="att_method")
    n_img = c3.number_input("How many", 1, 4, 3, key="att_n", disabled=source == SOURCES[2])
    c4.number_input("Set", 0, 999, 0, key="att_seed", help="Which held-out images: another number, other images",
                    disabled=source == SOURCES[2])
    images = targets = classes = None
    if source == SOURCES[2]:
        up = st.file_uploader("An image (it is cut to a square and resized to 32×32)", key="att_upload")
        if up is not None:
            try:
                img, notes = image_from_upload(up.getvalue())
                images, classes = img.transpose(2, 0, 1)[None], (first.config or {}).get("classes")
                for note in notes:
                    st.caption(f"Note: {note}.")
            except UploadError as e:
                st.error(f"{up.name}: {e}")
    else:
        pics = ui.pick_images(first if source == SOURCES[0] else None, int(n_img),
                              seed=int(st.session_state["att_seed"]))
        ui.source_note(pics)
        images, classes, targets = pics.x, pics.classes, tuple(int(v) for v in pics.y)
        if classes != (first.config or {}).get("classes"):
            targets = None  # other classes than the models know: explain each model's own prediction
            st.caption("These images are not from the runs' classes: every map explains the first run's "
                       "guess (under 'explained'), and each prediction is named with the run's own classes.")

    # the maps stay on screen across reruns only for the request they answer: other images, another
    # method or another selection of runs wait for the button (Occlusion on 4 models takes a while)
    keys = tuple((n, str(r.path), run_mtime_key(r)) for n, r in same)
    request = None if images is None else (source, method, int(n_img), hash(images.tobytes()), keys)
    if images is None:
        st.info("Upload an image to explain it.")
    elif st.button("Explain", type="primary", key="att_go") or st.session_state.get("att_done") == request:
        st.session_state["att_done"] = request
        with ui.guard("Cannot explain"), st.spinner(f"{METHODS[method]} for {len(same)} model(s)…"):
            res = explain(keys, images, targets, method, [r for _, r in same])
            colors = ui.colors_for([r for _, r in same])
            # a prediction is named with the classes of the run that made it, never the images' set's
            own = {n: (r.config or {}).get("classes") for n, r in same}
            # the pictures are sized for a projector's 1024 px; a wide screen can take them larger
            large = st.toggle("Large pictures", key="att_large",
                              help="For a wide screen: at 1024 px they would not fit across")
            # without targets of the runs' classes, every map explains the first run's prediction
            ui.show(plots.attribution_grid(to_display(images), res["maps"], res["predictions"],
                                           classes if targets is not None else own[same[0][0]], res["targets"],
                                           colors=colors, title=METHODS[method], model_classes=own,
                                           target_label="target" if targets is not None else "explained:",
                                           tile_px=LARGE_TILE_PX if large else None),
                    f"attributions-{method}",
                    "Each row is an image, each column a model: bright (or red) pixels pushed the model towards "
                    "the target class; titles give the model's prediction and confidence.")
            if res["agreement"]:
                for metric in ("spearman", "topk_iou"):
                    ns, m = res["agreement"][metric]
                    ui.show(plots.agreement_heatmap(ns, m, metric), f"agreement-{metric}",
                            "Rank correlation of the maps, mean over the images (1 = same order of importance)."
                            if metric == "spearman" else
                            "Overlap of the 10% most important pixels, mean over the images (1 = the same pixels).")
                ui.download_csv(res["pairs"], f"agreement-{method}.csv", "Download agreement (CSV)")
            else:
                st.caption("Select a second run trained on the same data to see how much they agree.")
