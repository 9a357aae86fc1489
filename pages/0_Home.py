"""PoolProp home: the method in one picture, the runs at hand, where to go next.

Reached through app.py's navigation (`streamlit run app.py`).
"""

import streamlit as st

from core.analysis import plots, run_groups, run_views
from core.analysis.images import to_display
from core.analysis.layers import layer_names
from core.analysis.method_picture import method_picture
from ui import common as ui
from ui.navigation import VIEWS

runs = ui.page("PoolProp", "Backpropagation with compressed activations: the forward pass stays exact; "
                           "each layer keeps only a pooled copy of its input for the backward pass.")

# ---------------------------------------------------------------------------------------
st.header("The method in one picture")
UNTRAINED = "untrained ResNet-20"
RUN_IMAGES, BUILT_IN = "run's images", "built-in set"
run_names = dict(zip(ui.names_of(runs), runs))
# two rows of controls: at a projector's 1024 px five columns squeeze labels into each other
c_model, c_src, c_img = st.columns([3, 2, 1])
model_name = c_model.selectbox("Model", [*run_names, UNTRAINED], key="home_model")
run = run_names.get(model_name)
source = c_src.radio("Images", [RUN_IMAGES, BUILT_IN], key="home_source", horizontal=True,
                     disabled=run is None, help="run's images: its validation images (for CIFAR-10 without its "
                                                "data, the shipped sample); built-in: features10, made on the fly")
index = c_img.number_input("Image no.", 0, 9, 0, key="home_image", help="Which of ten images")

with ui.guard("Cannot show the picture"):
    model = ui.model_of(run, private=True) if run is not None else ui.untrained_model("resnet20")
    pics = ui.pick_images(run if source == RUN_IMAGES else None, 10)
    convs = layer_names(model, "conv")
    default_layer = next((i for i, n in enumerate(convs) if n.endswith("layer1.0.conv2")), min(2, len(convs) - 1))
    c_layer, c_k, c_pool, c_ch = st.columns([3, 2, 2, 1])
    layer = c_layer.selectbox("Layer", convs, index=default_layer, key="home_layer")
    k = c_k.select_slider("K (pooling)", [1, 2, 4, 8], value=2, key="home_k")
    pool = c_pool.radio("Pooling", ["avg", "max"], horizontal=True, key="home_pool")
    channel = c_ch.number_input("Channel", 0, 511, 0, key="home_channel")
    x = ui.to_input(pics.x[index:index + 1], run)
    pic = method_picture(model, layer, x, k, pool, channel)
    c, h, w = pic["shape"]
    st.markdown(f"Layer input: **{c} channels × {h}×{w}**; the picture shows channel {pic['channel']}. "
                f"Image: *{pics.classes[int(pics.y[index])]}*.")
    ui.source_note(pics)
    ui.show(plots.method_figure(to_display(pics.x[index:index + 1])[0], pic["activation"], pic["pooled"],
                                pic["restored"], k, pool, layer, pic["channel"], pic["bytes"]),
            "method-picture",
            f"The forward pass multiplies the full activation with the weights; a compressed layer keeps only "
            f"the {k}×{k} {'averages' if pool == 'avg' else 'maxima'} for the backward pass, and computes its "
            f"weight gradient from the blocky copy at the bottom right (relative error {pic['rel_error']:.0%}). "
            "Input gradients stay exact.")
    b = pic["bytes"]
    items = {"full activation (ReLU keeps it too)": b["full"], f"pooled copy, K={k}": b["pooled"],
             "ReLU 1-bit mask": b["mask"]}
    ui.show(plots.bytes_bars(items, x_title=f"bytes per image, all {c} channels"), "method-bytes",
            "What this one layer keeps per image. Pooling alone adds a copy, because the ReLU before it still "
            "keeps the full tensor; with the 1-bit mask the full tensor can go.")

# ---------------------------------------------------------------------------------------
st.header("Runs at hand")
everything = ui.all_runs()
rows = ui.runs_table(everything)
if rows:
    st.dataframe(rows, hide_index=True, column_config={
        "folder": None,
        "accuracy %": st.column_config.NumberColumn(
            help="Validation accuracy after the last finished epoch: what the run's weights score "
                 "(the best epoch's is on the Loss curves page)", format="%.1f")})
    ui.download_csv(rows, "poolprop-runs.csv")
    broken = [r for r in everything if not r.ok]
    if broken:
        st.warning(f"{len(broken)} run folder(s) cannot be used; the 'note' column says why.")
else:
    st.info("No runs yet. The shipped checkpoints go in checkpoints/; train your own on the Train page.")

prows_all = ui.usable_runs()
# by the data a run learned (CIFAR-10 is CIFAR-10 wherever its folder was), not the path string
datasets = sorted({run_groups.data_name(r.config or {}) for r in prows_all
                   if isinstance((r.summary or {}).get("last_val_acc"), (int, float))})
if datasets:
    first = run_groups.data_name(runs[0].config or {}) if runs else None  # start on the picked runs' data
    start = datasets.index(first) if first in datasets else 0
    c_ds, c_ep = st.columns([3, 2])
    ds = c_ds.selectbox("Dataset for the accuracy-vs-memory plot", datasets, index=start,
                        key="home_pareto_ds") if len(datasets) > 1 else datasets[0]
    subset = [r for r in prows_all if run_groups.data_name(r.config or {}) == ds]
    # compare like with like: a longer schedule is another trade-off, so one schedule at a time
    # (20 epochs, the shipped runs' usual one, first), or all of them with a front each
    epochs = run_groups.filter_options(subset)["epochs"]
    usual = 20 if 20 in epochs else (epochs[0] if epochs else None)
    choices = [*epochs, "all"] if len(epochs) > 1 else epochs or ["all"]
    schedule = c_ep.selectbox("Schedule", choices, index=choices.index(usual) if usual in choices else 0,
                              key="home_pareto_epochs",
                              format_func=lambda e: "all, a front each" if e == "all" else f"{e} epochs")
    if schedule != "all":
        subset = run_groups.filter_runs(subset, epochs=schedule)
    settings = ui.settings_of(subset)
    ui.show(plots.pareto_scatter(run_views.pareto_setting_rows(settings), "saved activations per training image",
                                 colors=ui.setting_colors(settings),
                                 title=f"Accuracy vs memory · {run_groups.data_name(subset[0].config or {})}"
                                       + ("" if schedule == "all" else f" · {schedule} epochs")), "pareto",
            "Each dot is a run, or the mean of a setting's seeds with a bar from the lowest to the highest: "
            "further left keeps less for backward, higher is more accurate; diamonds on a dashed line are the "
            "best trade-offs of a schedule.")

# ---------------------------------------------------------------------------------------
st.header("Where to go")
for path, blurb in VIEWS:
    st.page_link(path, label=blurb)
