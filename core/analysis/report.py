"""`python -m core report --runs A B ... --out DIR`: results without the app.

Writes the main figures as standalone HTML (plotly.js inlined: opens offline, no CDN) and
the tables as CSV, plus an index.html linking them. Figures are the same builders the app
uses (core/analysis/plots/), so a run keeps its colour here too.
"""

from __future__ import annotations

import csv
import html
import io
from pathlib import Path

from ..engine import atomic
from ..engine.runs import RunError, inspect_run, load_model, read_metrics, resolve_run, run_labels


def rows_to_csv(rows: list[dict]) -> str:
    """Rows (dicts) as CSV text; the columns are the union of the keys, in first-seen order."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    for r in rows:
        writer.writerow({k: "" if r.get(k) is None else r.get(k) for k in keys})
    return buf.getvalue()


def build_report(run_refs: list[str], out: str | Path, thresholds=(0.5, 0.8, 0.9)) -> list[Path]:
    """Figures and tables over the given runs into `out`; returns the files written."""
    from . import curves, filters, plots
    from .layers import first_conv

    runs = []
    for ref in run_refs:
        run = inspect_run(resolve_run(ref))
        if not run.ok:
            raise RunError(f"{run.path}: {run.reason}")
        runs.append(run)
    if not runs:
        raise RunError("no runs given")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = run_labels(runs)  # keyed by folder, so a run given twice cannot shift the names
    labels = {names[str(r.path)]: r for r in runs}
    metrics = {label: list(read_metrics(r)) for label, r in labels.items()}
    colors = plots.color_map(list(labels))

    figures = {
        "train_loss": plots.loss_curves(metrics, y="train_loss", x="step", smoothing=0.6, colors=colors,
                                        title="Training loss"),
        "val_accuracy": plots.loss_curves(metrics, y="val_acc", x="epoch", colors=colors,
                                          title="Validation accuracy"),
    }
    pareto_rows, summary_rows = [], []
    for label, run in labels.items():
        s, c = run.summary or {}, run.config or {}
        acc = s.get("last_val_acc")  # the plotted accuracy: the last epoch's, what the weights score
        mem = s.get("saved_activation_bytes") or (c.get("memory") or {}).get("saved_activation_bytes")
        summary_rows.append({"run": label, "path": str(run.path), "status": run.status, "model": c.get("model"),
                             "dataset": c.get("dataset"), "policy": c.get("policy"), "epochs": s.get("epochs_done"),
                             "best_val_acc": s.get("best_val_acc"), "last_val_acc": acc,
                             "saved_activation_bytes": mem, "cuda_peak_bytes": s.get("cuda_peak_bytes"),
                             "wall_s": s.get("wall_s")})
        if acc is not None and mem:
            pareto_rows.append({"name": label, "policy": c.get("policy"), "acc": acc, "memory": mem})
    if pareto_rows:
        figures["accuracy_vs_memory"] = plots.pareto_scatter(pareto_rows, colors=colors,
                                                             title="Accuracy vs saved-activation memory")
    spectra = {}
    grids = {}
    for label, run in labels.items():
        model = load_model(run)
        spectra[label] = filters.layer_spectra(model)
        grids[label] = filters.filter_grid(model.get_submodule(first_conv(model)).weight, scale=4)
    figures["filters"] = plots.filter_grid_figure(grids, title="First-layer filters")
    figures["high_frequency_share"] = plots.hf_share_bars(spectra, colors=colors,
                                                          title="Share of filter energy above half Nyquist")

    tables = {"runs": summary_rows,
              "epochs_to_accuracy": curves.epochs_to_accuracy_table(metrics, thresholds),
              "high_frequency_share": [{"run": label, "layer": e["name"], "hf_share": e["hf_share"]}
                                       for label, entries in spectra.items() for e in entries]}
    written = []
    for name, fig in figures.items():
        path = out / f"{name}.html"
        atomic.write_text(path, fig.to_html(include_plotlyjs=True, full_html=True))
        written.append(path)
    for name, rows in tables.items():
        path = out / f"{name}.csv"
        atomic.write_text(path, rows_to_csv(rows))
        written.append(path)
    links = "".join(f'<li><a href="{html.escape(p.name)}">{html.escape(p.name)}</a></li>' for p in written)
    index = out / "index.html"
    atomic.write_text(index, f"<!doctype html><meta charset='utf-8'><title>PoolProp report</title>"
                             f"<h1>PoolProp report</h1><p>{len(runs)} runs: "
                             f"{html.escape(', '.join(labels))}</p><ul>{links}</ul>")
    return [index, *written]
