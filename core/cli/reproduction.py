"""`python -m core reproduction --runs checkpoints`: the README's reproduction table, re-measured."""

from __future__ import annotations

import json

from ..analysis.reproduction import add_memory, add_speed, format_markdown, group_runs, runs_in


def register(subparsers) -> None:
    p = subparsers.add_parser("reproduction", help="the reproduction table (accuracy, memory, speed) over runs")
    p.add_argument("--runs", nargs="*", default=["checkpoints"],
                   help="run folders or folders of runs (default: checkpoints)")
    p.add_argument("--batch", type=int, default=128, help="batch for the memory and speed columns")
    p.add_argument("--repeats", type=int, default=7, help="timed steps per policy; 0 skips the speed column")
    p.add_argument("--no-memory", action="store_true", help="skip the memory columns")
    p.add_argument("--json", action="store_true", help="print JSON instead of a markdown table")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.batch < 1:
        raise ValueError("--batch must be >= 1")
    rows = group_runs(runs_in(args.runs))
    if not rows:
        raise ValueError("no finished runs found in " + ", ".join(args.runs))
    if not args.no_memory:
        add_memory(rows, args.batch)
    if args.repeats > 0:
        add_speed(rows, args.batch, args.repeats)
    print(json.dumps(rows, indent=1) if args.json else format_markdown(rows))
    return 0
