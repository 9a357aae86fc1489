"""Screenshots of every page and every lesson step at projector sizes, for a person to look at:

    python tests/check_screens.py DIR                      # 1024x768 and 1920x1080, 1 and 6 runs
    python tests/check_screens.py DIR --sizes 1024x768 --runs 6 --pages lesson,memory

Each shot is DIR/<width>-<n>runs-<page>.png of the whole page (the window is stretched to the
page's height, at the given width, so that nothing below the fold is missed), after the page's
buttons were pressed (Measure, Compute, Explain, ...), against the shipped runs of checkpoints/
with no CIFAR-10 data (the server runs in an empty folder, as on a fresh clone). For every shot
it prints the texts that print over each other in a figure (browser_support.text_overlaps) and,
on Home, the width of the method picture's images. Not a test (the browser test checks the same
at one size): a few minutes of looking, before the README's pictures are re-taken.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import browser_support as bs  # noqa: E402

ROOT = bs.ROOT
ONE = ["none · 20 ep · s1"]
SIX = ["none · 20 ep · s1", "avg2+mask · 20 ep · s0", "avg4+mask · 20 ep · s0",
       "avg2+mask · 20 ep · s1", "max2+mask · 20 ep · s0", "avg2+mask+bn8 · 20 ep · s0"]
SERVER_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def full_shot(page, path: Path, size: tuple[int, int]) -> None:
    """The whole page at this width: stretch the window to the main area's height, shoot, restore."""
    w, h = size
    height = page.evaluate("() => document.querySelector('[data-testid=stMain]').scrollHeight")
    page.set_viewport_size({"width": w, "height": max(h, height + 20)})
    time.sleep(1.2)
    page.mouse.move(4, 4)
    page.screenshot(path=str(path))
    page.set_viewport_size({"width": w, "height": h})
    time.sleep(0.5)


def report(page, name: str) -> None:
    found = bs.text_overlaps(page)
    problems = bs.problems(page) + [f"warning: {w}" for w in bs.warnings(page)]
    print(f"  {name}: {len(found)} overlap(s)" + "".join(f"\n    {o}" for o in found)
          + "".join(f"\n    {p}" for p in problems))


def press(page, label: str) -> None:
    if page.locator('[data-testid="stMain"] button').filter(has_text=label).count():
        bs.click_button(page, label, timeout=600)


def visit(page, name: str, out: Path, prefix: str, size) -> None:
    if name == "lesson":
        bs.go_to(page, "lesson")
        for i in range(8):
            if i:
                bs.click_button(page, "Next")
            time.sleep(0.8)
            report(page, f"lesson step {i + 1}")
            full_shot(page, out / f"{prefix}-lesson-{i + 1}.png", size)
        return
    if name != "home":
        bs.go_to(page, name)
    for label in {"memory": ["Measure", "Find the peak", "Fit the planner"], "fidelity": ["Compute"],
                  "filters": ["Compute spectra", "Generate images", "Compare"],
                  "attributions": ["Explain"]}.get(name, []):
        press(page, label)
    time.sleep(1.0)
    report(page, name)
    if name == "home":
        print(f"    method picture images: {[round(w) for w in bs.image_widths(page)[:4]]} px wide")
    full_shot(page, out / f"{prefix}-{name}.png", size)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder")
    ap.add_argument("--sizes", default="1024x768,1920x1080")
    ap.add_argument("--runs", default="1,6")
    ap.add_argument("--pages", default="home,lesson,train,loss_curves,memory,fidelity,filters,attributions")
    a = ap.parse_args()
    why = bs.missing_requirements()
    if why:
        sys.exit(f"cannot take screenshots: {why}")
    out = Path(a.folder).resolve()
    out.mkdir(parents=True, exist_ok=True)
    sizes = [tuple(int(v) for v in s.split("x")) for s in a.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="poolprop-check-") as tmp:
        env = {"POOLPROP_RUN_DIRS": str(ROOT / "checkpoints"), "POOLPROP_RUNS_ROOT": tmp, **SERVER_ENV}
        with bs.streamlit_server(env, log_dir=Path(tmp), cwd=tmp) as server:
            for size in sizes:
                for n in (int(v) for v in a.runs.split(",")):
                    with bs.chromium_page({"width": size[0], "height": size[1]}) as page:
                        bs.open_url(page, server.url)
                        bs.set_selection(page, ONE if n == 1 else SIX[:n])
                        print(f"{size[0]}x{size[1]}, {n} run(s)")
                        for name in a.pages.split(","):
                            visit(page, name, out, f"{size[0]}-{n}runs", size)
            if "Traceback" in server.log_tail(100000):
                print("server log holds a traceback:\n" + server.log_tail(3000))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
