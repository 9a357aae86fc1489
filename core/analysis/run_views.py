"""Runs as the pages show them: the default selection, the runs table, the rows behind the
accuracy-vs-memory plot and the memory bars."""

from __future__ import annotations

from ..engine.runs import Run, dataset_label
from .reproduction import trained_on
from .run_groups import Setting, mean_range


def default_selection(runs: list[Run], n: int = 3) -> list[str]:
    """A sensible start: the largest group of runs sharing model and dataset (shipped first, real
    images before the built-in set), then one run per policy - baseline first, then the compressed
    policies the paper is about - each from the group's usual schedule and trained on its usual
    device and precision, so that curves, wall times and accuracies compare (the shipped 20-epoch
    baseline of seed 0 was trained on an H200 in bf16, every other CIFAR run on the CPU)."""
    ok = [r for r in runs if r.ok and (r.path / "model.safetensors").exists()] or [r for r in runs if r.ok]
    if not ok:
        return []
    groups: dict[tuple, list[Run]] = {}
    for r in ok:
        cfg = r.config or {}
        groups.setdefault((cfg.get("model"), cfg.get("dataset")), []).append(r)

    def real_images(g: list[Run]) -> bool:
        return not str((g[0].config or {}).get("dataset", "")).startswith("features10")

    best = max(groups.values(), key=lambda g: (len(g) >= 2, any(r.is_shipped for r in g), real_images(g), len(g)))
    epochs = [(r.config or {}).get("epochs") for r in best]
    usual = max(set(epochs), key=lambda e: (epochs.count(e), -(e or 0)))  # the shorter one on a tie
    devices = [trained_on(r.config or {}) for r in best]
    usual_device = max(sorted(set(devices)), key=devices.count)
    preference = ["none", "avg2+mask", "avg4+mask", "avg2+mask+bn8"]

    def rank(r: Run):
        cfg = r.config or {}
        pol = str(cfg.get("policy", ""))
        return (preference.index(pol) if pol in preference else len(preference), cfg.get("epochs") != usual,
                trained_on(cfg) != usual_device, not r.is_shipped, r.name)

    ordered = sorted(best, key=rank)
    first_of_policy: dict = {}
    for r in ordered:
        first_of_policy.setdefault((r.config or {}).get("policy"), r)
    picked = list(first_of_policy.values()) + [r for r in ordered if r not in first_of_policy.values()]
    return [str(r.path) for r in picked[:n]]


def _mib(n) -> float | None:
    return round(n / 2 ** 20, 1) if isinstance(n, (int, float)) else None


def saved_bytes_of(run: Run) -> tuple[int | None, int | None]:
    """(saved-activation bytes, batch size they were measured at) from summary or config."""
    s, cfg = run.summary or {}, run.config or {}
    mem = cfg.get("memory") or {}
    n = s.get("saved_activation_bytes") or mem.get("saved_activation_bytes")
    batch = mem.get("measured_batch") or cfg.get("batch_size")
    return n, batch


def runs_table(runs: list[Run], names: dict[str, str]) -> list[dict]:
    """One row per run (broken ones too) for the home page table and its CSV; `names` maps a
    run folder to its display name. The answers first (accuracy, memory, status): at a projector's
    1024 px the table shows five columns before it scrolls, and the name already says policy,
    schedule and seed."""
    rows = []
    for r in runs:
        cfg, s = r.config or {}, r.summary or {}
        saved, batch = saved_bytes_of(r)
        acc = s.get("last_val_acc")  # the last epoch's: what the saved weights score (no picking the best)
        rows.append({
            "run": names.get(str(r.path), r.name),
            "accuracy %": round(100 * acc, 1) if isinstance(acc, (int, float)) else None,
            "saved activations MiB": _mib(saved), "at batch": batch,
            "status": r.status + (" (shipped)" if r.is_shipped else ""),
            "epochs": f"{s.get('epochs_done', 0)}/{s.get('epochs', cfg.get('epochs', '?'))}" if cfg else None,
            "model": cfg.get("model"), "dataset": dataset_label(cfg["dataset"]) if cfg.get("dataset") else None,
            "policy": cfg.get("policy"),
            "note": r.reason or "; ".join(r.notes) or "", "folder": str(r.path),
        })
    return rows


def pareto_rows(runs: list[Run], names: dict[str, str]) -> list[dict]:
    """{"name", "policy", "epochs", "acc", "memory"} per run with an accuracy (its last epoch's,
    what its weights score): memory is saved activations per training image (runs used
    different batch sizes), in bytes."""
    rows = []
    for r in runs:
        saved, batch = saved_bytes_of(r)
        acc = (r.summary or {}).get("last_val_acc")
        if saved and batch and isinstance(acc, (int, float)):
            rows.append({"name": names[str(r.path)], "policy": (r.config or {}).get("policy", ""),
                         "epochs": (r.config or {}).get("epochs"), "acc": acc, "memory": saved / batch})
    return rows


def pareto_setting_rows(settings: list[Setting]) -> list[dict]:
    """pareto_rows per setting: the mean accuracy of its seeds, with their min and max
    ("acc_min", "acc_max"); named by the setting's label."""
    rows = []
    for s in settings:
        per = pareto_rows(s.runs, {str(r.path): m for r, m in zip(s.runs, s.members)})
        if not per:
            continue
        mean, lo, hi = mean_range([p["acc"] for p in per])
        rows.append({**per[0], "name": s.label, "acc": mean, "acc_min": lo, "acc_max": hi, "seeds": len(per)})
    return rows


def memory_rows(runs: list[Run], names: dict[str, str]) -> list[dict]:
    """{"name", "saved_bytes", "state_bytes", "batch"} per run, for plots.run_memory_bars."""
    rows = []
    for r in runs:
        saved, batch = saved_bytes_of(r)
        state = (r.summary or {}).get("model_state_bytes")
        if state is None:
            state = (((r.config or {}).get("memory") or {}).get("model_state_bytes") or {}).get("total")
        rows.append({"name": names[str(r.path)], "saved_bytes": saved, "state_bytes": state, "batch": batch})
    return rows
