"""The command line: `python -m core {train,evaluate,runs,bench,fidelity,report,reproduction}`.

Each command lives in its own module that exposes `register(subparsers)`; this file only
dispatches. No streamlit/captum/plotly at import time: the GPU machine has none of them.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# command -> module providing register(subparsers); register() sets `func` on its parser
COMMANDS = {
    "train": "core.train",
    "evaluate": "core.evaluate",
    "bench": "core.bench",
    "fidelity": "core.fidelity_cli",
    "report": "core.report",
    "runs": "core.runs",
    "reproduction": "core.reproduction",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m core", description="PoolProp: backprop with pooled activations")
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


if __name__ == "__main__":
    sys.exit(main())
