"""Loss curves: the selected runs overlaid, and how many epochs each needed to reach an accuracy."""

import streamlit as st

from core.analysis import curves, plots
from core.analysis.reproduction import trained_on
from core.engine.runs import dataset_label
from ui import common as ui

runs = ui.page("Loss curves", "Training loss, validation loss and validation accuracy of the selected runs.")

if ui.need_runs(runs, "loss curves"):
    names = ui.names_of(runs)
    by_name = dict(zip(names, runs))
    colors = ui.colors_for(runs)
    metrics = {n: ui.metrics_of(r) for n, r in zip(names, runs)}
    c1, c2, c3 = st.columns([2, 2, 1])
    # the settings outlive a visit to another page (ui.keep), so coming back shows the same view
    ui.keep("lc_x", "step")
    x = c1.radio("Against", list(plots.X_TITLES), format_func=plots.X_TITLES.get, horizontal=True, key="lc_x")
    ui.keep("lc_smooth", 0.6)
    smoothing = c2.slider("Smoothing", 0.0, 0.95, step=0.05, key="lc_smooth",
                          help="Exponential moving average of the training loss (0 = raw)")
    ui.keep("lc_log", False)
    log_y = c3.checkbox("Log scale", key="lc_log")

    ui.show(plots.loss_curves(metrics, "train_loss", x, smoothing=smoothing, log_y=log_y, show_raw=True,
                              colors=colors, title="Training loss"), "train-loss",
            "Loss on the training batches as the run learns; the faint line is the raw value.")
    left, right = st.columns(2)
    with left:
        ui.show(plots.loss_curves(metrics, "val_loss", x, log_y=log_y, colors=colors, title="Validation loss"),
                "val-loss", "Loss on held-out images, once per epoch.")
    with right:
        ui.show(plots.loss_curves(metrics, "val_acc", x, colors=colors, title="Validation accuracy"),
                "val-accuracy", "Share of held-out images classified correctly, once per epoch.")

    st.subheader("Epochs to reach an accuracy")
    best = max([r.get("val_acc") or 0 for recs in metrics.values() for r in recs if r.get("type") == "eval"]
               + [0.0])
    default = round(max(0.1, min(0.95, 0.9 * best)) * 20) / 20
    target = st.slider("Target validation accuracy", 0.05, 1.0, default, 0.05, key="lc_target", format="%.2f")
    rows = curves.epochs_to_accuracy_table(metrics, [target])
    key_e, key_w = f"epochs_to_{target:g}", f"wall_to_{target:g}"
    # the answer first (epochs, seconds), then the context; "never" for a run that did not get there
    table = [{"run": r["run"],
              f"epochs to {target:.0%}": "never" if r[key_e] is None else f"{r[key_e]:g}",
              f"seconds to {target:.0%}": "never" if r[key_w] is None else f"{r[key_w]:.1f}",
              "trained on": trained_on(by_name[r["run"]].config or {}),  # seconds compare on one device only
              "best accuracy %": "" if r["best_val_acc"] is None else f"{100 * r['best_val_acc']:.1f}",
              "at epoch": "" if r["best_epoch"] is None else f"{r['best_epoch']:g}"} for r in rows]
    st.dataframe(table, hide_index=True)  # full width: run names are long, and every column counts
    ui.download_csv(table, "epochs-to-accuracy.csv")
    left, _ = st.columns([3, 2])
    with left:
        ui.show(plots.time_to_accuracy_bars(rows, target, colors=colors), "epochs-to-accuracy",
                "Fewer epochs is better; compressed runs may need a longer schedule.")

    st.subheader("Accuracy per class")
    groups, no_classes = curves.per_class_groups(
        {n: ((r.config or {}).get("classes"), (r.summary or {}).get("per_class_val_acc")) for n, r in by_name.items()})
    for i, group in enumerate(groups):
        in_group = list(group["runs"])
        data = dataset_label((by_name[in_group[0]].config or {}).get("dataset"))
        reference = None
        if len(in_group) > 1:  # a difference to one run shows which classes a setting costs
            baseline = next((n for n in in_group if (by_name[n].config or {}).get("policy") == "none"), None)
            choices = {"accuracy": None, **{f"change vs {n}": n for n in in_group}}
            default = list(choices.values()).index(baseline)  # no baseline: "accuracy"
            reference = choices[st.selectbox(f"Show ({data})", list(choices), index=default,
                                             key=f"lc_class_ref_{i}_{'|'.join(in_group)}")]
        title = ("Per-class accuracy" + (f" on {data}" if len(groups) > 1 else "")
                 + (f", change vs {reference}" if reference else ""))
        ui.show(plots.per_class_bars(group["classes"], group["runs"], reference=reference, colors=colors,
                                     title=title), f"per-class-{data}",
                "At the last evaluation; with few images per class a few points are noise.")
    if no_classes:
        st.caption("No per-class figures (runs from before they were recorded, or not evaluated yet): "
                   + ", ".join(no_classes))
