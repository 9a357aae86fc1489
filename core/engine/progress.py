"""Progress on stderr: tqdm when present and on a terminal, plain lines otherwise (the GPU
machine may lack tqdm; a log file wants lines)."""

from __future__ import annotations

import sys


class _LinePrinter:
    """Minimal stand-in for tqdm: one line per logged step on stderr."""

    def __init__(self, total, initial=0, desc=""):
        self.total, self.n, self.desc = total, initial, desc

    def update(self, n=1):
        self.n += n

    def set_postfix(self, d: dict):
        items = " ".join(f"{k}={v}" for k, v in d.items())
        print(f"{self.desc} step {self.n}/{self.total} {items}", file=sys.stderr, flush=True)

    def write(self, s):
        print(s, file=sys.stderr, flush=True)

    def close(self):
        pass


def progress_bar(total, initial, enabled: bool):
    if not enabled:
        return None
    if sys.stderr.isatty():
        try:
            from tqdm import tqdm

            return tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True, leave=True)
        except ImportError:
            pass
    return _LinePrinter(total, initial, desc="train")
