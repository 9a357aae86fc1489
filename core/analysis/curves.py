"""Small data helpers behind the curve and comparison figures (plots.py only shapes data).

Reads the records of a run's metrics.jsonl (docs/training.md), as lists of dicts:
    step records  {"type": "step", "step", "epoch" (0-based, running), "loss", "acc", "lr", "wall", ...}
    eval records  {"type": "eval", "epoch" (epochs completed), "step", "val_loss", "val_acc", "wall", ...}
Other types ("fidelity", "resume") are ignored here. A record without "type" that has
"loss" counts as a step record. Accuracies are in the units the records use (fractions).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

# y name -> (record kind, key in that record)
Y_SOURCES = {
    "train_loss": ("step", "loss"),
    "train_acc": ("step", "acc"),
    "val_loss": ("eval", "val_loss"),
    "val_acc": ("eval", "val_acc"),
    "lr": ("step", "lr"),
    "step_time": ("step", "step_time"),
}
X_KINDS = ("step", "epoch", "wall")
MAX_POINTS = 2000


def _kind(record: Mapping) -> str | None:
    t = record.get("type")
    if t is None and "loss" in record:
        return "step"
    return t


def records_of(records: Sequence[Mapping], kind: str) -> list[Mapping]:
    return [r for r in records if _kind(r) == kind]


def steps_per_epoch(records: Sequence[Mapping]) -> float | None:
    """Steps in one epoch, from eval records (step / epochs completed) or, failing that,
    from the last step logged in epoch 0 when later epochs exist. None when unknown."""
    for r in records_of(records, "eval"):
        if r.get("epoch") and r.get("step"):
            return r["step"] / r["epoch"]
    steps = records_of(records, "step")
    if any((r.get("epoch") or 0) >= 1 for r in steps):
        first = [r["step"] for r in steps if r.get("epoch") == 0 and r.get("step") is not None]
        if first:
            return float(max(first))
    return None


def series(records: Sequence[Mapping], y: str = "train_loss", x: str = "step",
           spe: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(xs, ys) of one quantity over one axis, records without a value dropped.

    x="epoch" on step records gives fractional epochs (step / steps per epoch, estimated
    from the records unless `spe` is given), so they line up with eval records, whose
    epoch is the number of epochs completed.
    """
    if y not in Y_SOURCES:
        raise ValueError(f"unknown y {y!r}; use one of {', '.join(Y_SOURCES)}")
    if x not in X_KINDS:
        raise ValueError(f"unknown x {x!r}; use one of {', '.join(X_KINDS)}")
    kind, key = Y_SOURCES[y]
    rows = [r for r in records_of(records, kind) if _finite(r.get(key))]
    if x == "epoch" and kind == "step":
        spe = spe or steps_per_epoch(records)
        xs = [r["step"] / spe if spe else r.get("epoch") for r in rows]
    else:
        xs = [r.get(x) for r in rows]
    keep = [i for i, v in enumerate(xs) if _finite(v)]
    return (np.array([xs[i] for i in keep], dtype=np.float64),
            np.array([rows[i][key] for i in keep], dtype=np.float64))


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def ema(values: Sequence[float], smoothing: float = 0.0) -> np.ndarray:
    """Debiased exponential moving average (TensorBoard's slider): smoothing in [0, 1),
    0 = raw values. The first points are not dragged towards 0; NaNs are carried over."""
    v = np.asarray(values, dtype=np.float64)
    if not 0.0 <= smoothing < 1.0:
        raise ValueError("smoothing must be in [0, 1)")
    if smoothing == 0.0 or v.size == 0:
        return v.copy()
    out = np.empty_like(v)
    last, weight = 0.0, 0.0
    for i, val in enumerate(v):
        if not math.isfinite(val):
            out[i] = val
            continue
        last = smoothing * last + (1 - smoothing) * val
        weight = smoothing * weight + (1 - smoothing)
        out[i] = last / weight
    return out


def downsample(xs: np.ndarray, ys: np.ndarray, max_points: int = MAX_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """At most `max_points` evenly spaced points, first and last kept (smooth first)."""
    n = len(xs)
    if n <= max_points:
        return np.asarray(xs), np.asarray(ys)
    idx = np.unique(np.linspace(0, n - 1, max_points).round().astype(int))
    return np.asarray(xs)[idx], np.asarray(ys)[idx]


def epochs_to_accuracy(records: Sequence[Mapping], threshold: float) -> dict | None:
    """The first eval record reaching val_acc >= threshold, as {epoch, step, wall, val_acc};
    None if the run never got there."""
    for r in records_of(records, "eval"):
        acc = r.get("val_acc")
        if _finite(acc) and acc >= threshold:
            return {"epoch": r.get("epoch"), "step": r.get("step"), "wall": r.get("wall"), "val_acc": acc}
    return None


def epochs_to_accuracy_table(runs_metrics: Mapping[str, Sequence[Mapping]],
                             thresholds: Sequence[float]) -> list[dict]:
    """One row per run: best val_acc and its epoch, then for each threshold t the epochs
    (key f"epochs_to_{t:g}") and wall seconds (f"wall_to_{t:g}") to first reach it (None: never)."""
    rows = []
    for name, records in runs_metrics.items():
        evals = [r for r in records_of(records, "eval") if _finite(r.get("val_acc"))]
        best = max(evals, key=lambda r: r["val_acc"], default=None)
        row = {"run": name, "best_val_acc": best["val_acc"] if best else None,
               "best_epoch": best.get("epoch") if best else None,
               "epochs": max((r.get("epoch") or 0 for r in evals), default=None)}
        for t in thresholds:
            hit = epochs_to_accuracy(records, t)
            row[f"epochs_to_{t:g}"] = hit["epoch"] if hit else None
            row[f"wall_to_{t:g}"] = hit["wall"] if hit else None
        rows.append(row)
    return rows


def per_class_groups(runs: Mapping[str, tuple[Sequence[str] | None, Sequence | None]]) -> tuple[list[dict], list[str]]:
    """Runs {name: (class names, per-class validation accuracy)} grouped by their class list, so
    that only runs of the same classes share a chart: ([{"classes": [...], "runs": {name: [acc
    or None per class]}}] in first-seen order, [names of runs without per-class figures])."""
    groups: dict[tuple, dict] = {}
    missing = []
    for name, (classes, accs) in runs.items():
        if not classes or not accs or len(classes) != len(accs):
            missing.append(name)
            continue
        group = groups.setdefault(tuple(classes), {"classes": list(classes), "runs": {}})
        group["runs"][name] = [a if _finite(a) else None for a in accs]
    return list(groups.values()), missing


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes, where lower x (memory) and
    higher y (accuracy) are better; sorted by x. Points with a missing value are skipped."""
    order = sorted((i for i, (x, y) in enumerate(points) if _finite(x) and _finite(y)),
                   key=lambda i: (points[i][0], -points[i][1]))
    front, best_y = [], -math.inf
    for i in order:
        if points[i][1] > best_y:
            front.append(i)
            best_y = points[i][1]
    return front


__all__ = ["MAX_POINTS", "X_KINDS", "Y_SOURCES", "downsample", "ema", "epochs_to_accuracy",
           "epochs_to_accuracy_table", "pareto_front", "per_class_groups", "records_of", "series", "steps_per_epoch"]
