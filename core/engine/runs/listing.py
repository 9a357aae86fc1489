"""Finding runs, shipped and new, and naming them for people (docs/training.md).

`list_runs` never raises for one bad run: it lists it as `broken` with a one-line reason, so
a page can show what is wrong instead of crashing.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from .paths import LOCAL_DIR, SHIPPED_DIR
from .reader import (
    PICKLE_SUFFIXES,
    RUN_FILES,
    Run,
    RunError,
    run_path,
    metrics_tail_cut,
    check_weights,
    expected_state_shapes,
    load_config,
    load_summary,
    pid_alive,
)


def _is_run_dir(p: Path) -> bool:
    return p.is_dir() and any((p / f).exists() for f in RUN_FILES)


def run_folders(base: Path) -> list[Path]:
    """The runs in `base`: base itself if it is a run, else the runs in it and, one level down,
    in its folders that are not runs (a group such as runs/shipped/, where the retraining
    script writes). Hidden folders (runs/.launcher) are skipped."""
    if _is_run_dir(base):
        return [base]
    found = []
    for child in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if _is_run_dir(child):
            found.append(child)
            continue
        try:
            found += sorted(p for p in child.iterdir() if _is_run_dir(p))
        except OSError:  # an unreadable folder beside the runs hides nothing else
            pass
    return found


def inspect_run(path: str | os.PathLike, is_shipped: bool = False) -> Run:
    """Read one run folder into a Run; never raises (a bad run comes back `broken`)."""
    path = Path(path)
    run = Run(path=path, name=path.name, is_shipped=is_shipped)
    try:
        for f in sorted(path.iterdir()):
            if f.suffix.lower() in PICKLE_SUFFIXES:
                run.notes.append(f"ignored {f.name}: pickle checkpoints are refused (safetensors only)")
        run.config = load_config(path)
        run.summary = load_summary(path)
        status = (run.summary or {}).get("status")
        if status == "running":
            status = "running" if pid_alive(run.summary.get("pid")) else "interrupted"
            if status == "interrupted":
                run.notes.append("summary says running but its process is gone")
        elif status not in ("finished", "failed", "stopped"):
            status = "interrupted"
            if run.summary is None:
                run.notes.append("no summary.json")
        weights = path / "model.safetensors"
        if weights.exists() or status in ("finished", "stopped") or is_shipped:
            check_weights(weights, expected_state_shapes(run.config))
        if metrics_tail_cut(path / "metrics.jsonl"):
            run.notes.append("metrics.jsonl: last line cut mid-write (skipped when read)")
        run.status = status
    except RunError as e:
        run.status, run.reason = "broken", str(e).replace(str(path) + "/", "")
    except Exception as e:  # noqa: BLE001 - listing must survive anything one run throws
        run.status, run.reason = "broken", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return run


def _same_run_key(r: Run) -> tuple | None:
    """What two folders holding the same run share: name, start time and how far it got
    (a copy trained on further differs)."""
    if not (r.config or {}).get("created"):
        return None
    s = r.summary or {}
    return r.name, r.config["created"], s.get("status"), s.get("epochs_done"), s.get("last_val_acc")


def default_dirs() -> list[Path]:
    return [SHIPPED_DIR, LOCAL_DIR]


def list_runs(dirs=None, include_default: bool = True) -> list[Run]:
    """Runs found in checkpoints/ (shipped), runs/ (local) and `dirs` (folders of runs, or runs),
    one level of group folders deep (`run_folders`).

    Sorted shipped first, then newest first. Missing folders are skipped silently. A copy of a
    run (the same run, as `train_shipped.py --collect` leaves one in runs/shipped/ and one in
    checkpoints/) is listed once, the shipped one kept.
    """
    bases = (default_dirs() if include_default or dirs is None else []) + [Path(d) for d in (dirs or [])]
    seen: set[Path] = set()
    runs: list[Run] = []
    for base in bases:
        if not base.is_dir():
            continue
        shipped = base.resolve() == SHIPPED_DIR.resolve()
        for p in run_folders(base):
            key = p.resolve()
            if key in seen:
                continue
            seen.add(key)
            runs.append(inspect_run(p, is_shipped=shipped))
    kept, copies = [], set()
    for r in sorted(runs, key=lambda r: not r.is_shipped):  # the shipped copy of a run wins
        same = _same_run_key(r)
        if same not in copies:
            kept.append(r)
            copies.add(same or r.path)

    def order(r: Run):
        try:
            mtime = max((r.path / f).stat().st_mtime for f in RUN_FILES if (r.path / f).exists())
        except (OSError, ValueError):
            mtime = 0.0
        return (not r.is_shipped, -mtime, r.name)

    return sorted(kept, key=order)


def dataset_label(name) -> str:
    """'features10', 'cifar10', or an image folder by its last meaningful parts ('cifar/train')."""
    name = str(name or "?")
    if not name.startswith("imagefolder:"):
        return name
    parts = Path(name.split(":", 1)[1].rstrip("/\\")).parts
    keep = parts[-2:] if parts and parts[-1].lower() in ("train", "val", "test", "images", "data") else parts[-1:]
    return "/".join(keep) or "imagefolder"


def run_labels(runs: list[Run]) -> dict[str, str]:
    """Run folder -> a short unique display name: 'avg2+mask · features10', with the model, the
    epochs ('· 30 ep') and the seed only when the runs differ in them (then on every name, so a
    legend reads alike); runs still alike get their start time, then their folder. The app's
    legends and `core report` both use it. A run listed twice gets one name."""
    runs = list({str(r.path): r for r in runs}.values())
    cfgs = {str(r.path): (r.config or {}) for r in runs}
    models = {c.get("model") for c in cfgs.values() if c}
    epochs = {c.get("epochs") for c in cfgs.values() if c}
    seeds = {c.get("seed", 0) for c in cfgs.values() if c}

    def short(r: Run) -> str:
        c = cfgs[str(r.path)]
        if not c.get("model"):
            return r.name
        text = (f"{c['model']} " if len(models) > 1 else "") + f"{c.get('policy', 'none')} · "
        text += dataset_label(c.get("dataset"))
        text += f" · {c['epochs']} ep" if len(epochs) > 1 and c.get("epochs") else ""
        return text + (f" · s{c.get('seed', 0)}" if len(seeds) > 1 else "")

    base = {str(r.path): short(r) for r in runs}
    for extra in ("time", "folder"):  # still alike: the start time, then the folder
        count = Counter(base.values())
        alike = [r for r in runs if count[base[str(r.path)]] > 1]
        names = Counter(r.name for r in alike)
        for r in alike:
            key = str(r.path)
            when = str(cfgs[key].get("created", ""))[11:19]
            if extra == "time" and when:
                base[key] += f" · {when}"
            elif extra == "folder":  # with the folder above it where two folders share a name
                base[key] += f" ({r.name})" if names[r.name] == 1 else f" ({r.path.parent.name}/{r.name})"
    return base


def run_mtime_key(run) -> float:
    """mtime of model.safetensors (0.0 when absent): a cache key that changes with the weights."""
    try:
        return (run_path(run) / "model.safetensors").stat().st_mtime
    except OSError:
        return 0.0
