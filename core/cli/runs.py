"""`python -m core runs`: the runs found, with their status and accuracy."""

from __future__ import annotations

import json

from ..engine.runs import dataset_label, default_dirs, list_runs


def _fmt_acc(v) -> str:
    return f"{100 * v:.1f}%" if isinstance(v, (int, float)) else "-"


def cmd_runs(args) -> int:
    dirs = args.dir or None
    runs = list_runs(dirs, include_default=not args.dir)
    if args.json:
        print(json.dumps([r.to_dict() for r in runs], indent=2, default=str))
        return 0
    if not runs:
        where = ", ".join(str(d) for d in (dirs or default_dirs()))
        print(f"no runs in {where}")
        return 0
    rows = [("run", "status", "model", "policy", "dataset", "epochs", "val acc", "")]
    for r in runs:
        cfg, s = r.config or {}, r.summary or {}
        note = r.reason or "; ".join(r.notes)
        rows.append((r.name + (" *" if r.is_shipped else ""), r.status, str(cfg.get("model", "-")),
                     str(cfg.get("policy", "-")), dataset_label(cfg["dataset"]) if cfg.get("dataset") else "-",
                     f"{s.get('epochs_done', '-')}/{s.get('epochs', cfg.get('epochs', '-'))}",
                     _fmt_acc(s.get("last_val_acc")), note))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row[:-1], widths)) + ("  " + row[-1] if row[-1] else ""))
    if any(r.is_shipped for r in runs):
        print("* shipped (checkpoints/)")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("runs", help="list runs (shipped and local) with their status",
                              description="List runs in checkpoints/ and runs/ (or --dir), and in their group folders "
                                          "such as runs/shipped/, with status and accuracy.")
    p.add_argument("--dir", action="append", help="folder of runs (or a run) to list instead; repeatable")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_runs)
