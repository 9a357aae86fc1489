"""The command line: `python -m core {train,evaluate,runs,bench,fidelity,report,reproduction,plan}`.

Each command lives in its own module here that exposes `register(subparsers)`; this file only
dispatches. Thin: flags in, one core call, text out. May use every layer below (method,
models, engine, analysis). No streamlit/captum/plotly at import time: the GPU machine has
none of them.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# command -> module providing register(subparsers); register() sets `func` on its parser
COMMANDS = {
    "train": "core.cli.train",
    "evaluate": "core.cli.evaluate",
    "bench": "core.cli.bench",
    "fidelity": "core.cli.fidelity",
    "report": "core.cli.report",
    "runs": "core.cli.runs",
    "reproduction": "core.cli.reproduction",
    "plan": "core.cli.plan",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m core",
        description="PoolProp: backpropagation with compressed (pooled or quantised) activations")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS.values():
        importlib.import_module(module).register(sub)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # output piped into a reader that stopped (`| head`): end quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush must not fail again
        return 1
    except (ValueError, FileNotFoundError, KeyboardInterrupt) as e:  # bad input: one line
        if isinstance(e, KeyboardInterrupt):
            print("interrupted", file=sys.stderr)
            return 130
        print(f"error: {e}", file=sys.stderr)
        return 2

