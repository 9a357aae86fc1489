"""Loss curves: the selected runs overlaid (seeds of one setting as a band), and how many epochs
each needed to reach an accuracy."""

import streamlit as st

from core.analysis import curves, plots, run_groups
from ui import common as ui

runs = ui.page("Loss curves", "Training loss, validation loss and validation accuracy of the selected runs; "
                              "runs that differ only by seed are one setting (their mean, and a band from the "
                              "lowest to the highest) unless 'Seeds one by one' is on.")


def _range(row: dict, key: str, fmt: str) -> str:
    """'13' for one seed, '13.5 (13–14)' for a setting's mean and range; 'never'."""
    if key.startswith("wall_") and row.get("wall_mixed"):
        return "— (seeds on different devices)"
    if row[key] is None:
        return "never" if not row.get("reached") else f"never ({row['reached']} of {row['seeds']} seeds reached)"
    text = format(row[key], fmt)
    lo, hi = row.get(f"{key}_min"), row.get(f"{key}_max")
    return text + (f" ({format(lo, fmt)}–{format(hi, fmt)})" if row["seeds"] > 1 and hi != lo else "")


if ui.need_runs(runs, "loss curves"):
    names = ui.names_of(runs)
    settings = ui.settings_of(runs)
    groups = {s.label: s.members for s in settings}
    colors = ui.setting_colors(settings)
    devices = {s.label: s.devices for s in settings}
    metrics = {n: ui.metrics_of(r) for n, r in zip(names, runs)}
    c1, c2, c3 = st.columns([5, 4, 2])
    # the settings outlive a visit to another page (ui.keep), so coming back shows the same view
    ui.keep("lc_x", "step")
    # "seconds", not the axis title "wall time (s)": three options on one line at a projector's 1024 px
    x = c1.radio("Against", list(plots.X_TITLES), format_func=lambda k: "seconds" if k == "wall" else plots.X_TITLES[k],
                 horizontal=True, key="lc_x", help="Training step, epoch, or seconds of training (wall time)")
    ui.keep("lc_smooth", 0.6)
    smoothing = c2.slider("Smoothing", 0.0, 0.95, step=0.05, key="lc_smooth",
                          help="Exponential moving average of the training loss (0 = raw)")
    ui.keep("lc_log", False)
    log_y = c3.checkbox("Log scale", key="lc_log")

    common = dict(colors=colors, groups=groups, devices=devices)
    ui.show(plots.loss_curves(metrics, "train_loss", x, smoothing=smoothing, log_y=log_y, show_raw=True,
                              title="Training loss", **common), "train-loss",
            "Loss on the training batches as the run learns; the faint line is the raw value, a shaded band "
            "the range of a setting's seeds.")
    # one below the other: side by side, each would be 300 px wide on a projector
    ui.show(plots.loss_curves(metrics, "val_loss", x, log_y=log_y, title="Validation loss", **common),
            "val-loss", "Loss on held-out images, once per epoch.")
    ui.show(plots.loss_curves(metrics, "val_acc", x, title="Validation accuracy", **common),
            "val-accuracy", "Share of held-out images classified correctly, once per epoch.")

    st.subheader("Epochs to reach an accuracy")
    best = max([r.get("val_acc") or 0 for recs in metrics.values() for r in recs if r.get("type") == "eval"]
               + [0.0])
    default = round(max(0.1, min(0.95, 0.9 * best)) * 20) / 20
    target = st.slider("Target validation accuracy", 0.05, 1.0, default, 0.05, key="lc_target", format="%.2f")
    rows = run_groups.epochs_to_accuracy_rows(settings, metrics, target)
    key_e, key_w = f"epochs_to_{target:g}", f"wall_to_{target:g}"
    # the answer first (epochs, seconds), then the context; "never" for a run that did not get there
    table = [{"run": r["run"], f"epochs to {target:.0%}": _range(r, key_e, "g"),
              f"seconds to {target:.0%}": _range(r, key_w, ".0f"),
              "best accuracy %": "" if r["best_val_acc"] is None else f"{100 * r['best_val_acc']:.1f}",
              "at epoch": "" if r["best_epoch"] is None else f"{r['best_epoch']:g}",
              "trained on": "; ".join(r["devices"])} for r in rows]  # last: long, and read only for the seconds
    st.dataframe(table, hide_index=True)  # full width: run names are long, and every column counts
    if len({d for r in rows for d in r["devices"]}) > 1:
        st.caption("These runs trained on different devices: compare their seconds only within one device.")
    ui.download_csv(table, "epochs-to-accuracy.csv")
    ui.show(plots.time_to_accuracy_bars(rows, target, colors=colors), "epochs-to-accuracy",
            "Fewer epochs is better; compressed runs may need a longer schedule. A bar on a setting spans its seeds.")

    st.subheader("Accuracy per class")
    per_setting = {s.label: run_groups.per_class_of(s) for s in settings}
    groups_pc, no_classes = curves.per_class_groups(
        {label: (classes, mean) for label, (classes, mean, _, _) in per_setting.items()})
    for i, group in enumerate(groups_pc):
        in_group = list(group["runs"])
        first = next(s for s in settings if s.label == in_group[0]).runs[0]
        data = run_groups.data_name(first.config or {})  # "CIFAR-10", not a folder's path
        reference = None
        if len(in_group) > 1:  # a difference to one run shows which classes a setting costs
            baseline = next((s.label for s in settings if s.label in in_group
                             and (s.runs[0].config or {}).get("policy") == "none"), None)
            choices = {"accuracy": None, **{f"change vs {n}": n for n in in_group}}
            default = list(choices.values()).index(baseline)  # no baseline: "accuracy"
            reference = choices[st.selectbox(f"Per-class bars, {data}", list(choices), index=default,
                                             key=f"lc_class_ref_{i}_{'|'.join(in_group)}")]
        title = ("Per-class accuracy" + (f" on {data}" if len(groups_pc) > 1 else "")
                 + (f", change vs {reference}" if reference else ""))
        ranges = {label: (per_setting[label][2], per_setting[label][3]) for label in in_group
                  if len(groups[label]) > 1 and reference is None}
        ui.show(plots.per_class_bars(group["classes"], group["runs"], reference=reference, colors=colors,
                                     title=title, ranges=ranges), f"per-class-{data}",
                "At the last evaluation; with few images per class a few points are noise. A bar on a setting "
                "spans its seeds.")
    if no_classes:
        st.caption("No per-class figures (runs from before they were recorded, or not evaluated yet): "
                   + ", ".join(no_classes))
    if any(len(s.members) > 1 for s in settings):
        st.caption("Settings of several seeds: " + "; ".join(f"{s.label}: {', '.join(s.members)}"
                                                            for s in settings if len(s.members) > 1))
