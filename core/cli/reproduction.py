"""`python -m core reproduction --runs checkpoints`: the README's reproduction table, re-measured."""

from __future__ import annotations

import json

import torch

from ..analysis.reproduction import add_memory, add_speed, format_markdown, group_runs, runs_in


def register(subparsers) -> None:
    p = subparsers.add_parser("reproduction", help="the reproduction table (accuracy, memory, speed) over runs")
    p.add_argument("--runs", nargs="*", default=["checkpoints"],
                   help="run folders or folders of runs (default: checkpoints)")
    p.add_argument("--batch", type=int, default=128, help="batch for the memory and speed columns")
    p.add_argument("--repeats", type=int, default=15, help="timed steps per policy; 0 skips the speed column")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for the speed column (default 1, as the README's speed table: on a busy "
                        "2-core machine two threads' process time counts their spin-waits)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory columns")
    p.add_argument("--json", action="store_true", help="print JSON instead of a markdown table")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.batch < 1:
        raise ValueError("--batch must be >= 1")
    rows = group_runs(runs_in(args.runs))
    if not rows:
        raise ValueError("no finished runs found in " + ", ".join(args.runs))
    if args.repeats > 0:
        if args.threads < 1:
            raise ValueError("--threads must be >= 1")
        before = torch.get_num_threads()
        torch.set_num_threads(args.threads)
        try:  # first, in a fresh process as `bench speed` times: the memory columns' many models come after
            add_speed(rows, args.batch, args.repeats)
        finally:
            torch.set_num_threads(before)
    if not args.no_memory:
        add_memory(rows, args.batch)
    print(json.dumps(rows, indent=1) if args.json else format_markdown(rows))
    return 0
