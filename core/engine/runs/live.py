"""Where a run being trained is, read cheaply from its files (the app polls this every few seconds).

Only config.json, summary.json and the last bytes of metrics.jsonl are read, never the whole log.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path


def live_progress(run_dir) -> dict:
    """Where a run is: {"step", "total_steps", "epoch", "epochs", "status"} from its config.json,
    summary.json and the last lines of metrics.jsonl (no full read)."""
    run_dir = Path(run_dir)
    out = {"step": 0, "total_steps": None, "epoch": 0, "epochs": None, "status": None}
    for name in ("config.json", "summary.json"):
        with contextlib.suppress(OSError, ValueError):
            d = json.loads((run_dir / name).read_text())
            out["total_steps"] = d.get("total_steps", out["total_steps"])
            out["epochs"] = d.get("epochs", out["epochs"])
            if name == "summary.json":
                out["status"] = d.get("status")
                out["step"] = d.get("steps", 0) or 0
                out["epoch"] = d.get("epochs_done", 0) or 0
    for rec in reversed(tail_records(run_dir / "metrics.jsonl")):
        if rec.get("type") == "step":
            out["step"] = max(out["step"], int(rec.get("step", 0)))
            break
    return out


def tail_records(path: Path, nbytes: int = 8192) -> list[dict]:
    """The records in the last `nbytes` of a metrics.jsonl (all of them in a shorter file)."""
    try:
        with open(path, "rb") as f:
            start = max(0, f.seek(0, os.SEEK_END) - nbytes)
            f.seek(start)
            lines = f.read().split(b"\n")
    except OSError:
        return []
    if start > 0:
        lines = lines[1:]  # the first line read is cut: it began before `start`
    out = []
    for ln in lines:
        with contextlib.suppress(ValueError):
            rec = json.loads(ln)
            if isinstance(rec, dict):
                out.append(rec)
    return out


def progress_fraction(p: dict) -> float:
    total = p.get("total_steps") or 0
    return min(1.0, p["step"] / total) if total else 0.0
