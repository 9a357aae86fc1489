"""What a compressed step costs in a real training run, as `python -m core train` runs it:

    python scripts/trainer_speed.py                                  # ResNet-20, batch 128, one thread
    python scripts/trainer_speed.py --policies none avg2+mask+bn8 --rounds 5 --steps 60

`bench speed` times every policy's step in one process, interleaved; a training run is one
policy in a process of its own, with its data loader, optimiser and schedule. The two disagree
on this CPU (docs/benchmarks.md, "In a training run, and the allocator"), so this script
measures the second: each
policy trains `--steps` steps on the built-in features10 images in a fresh process, the
policies take turns for `--rounds` rounds, and each run's median logged step time (wall, data
loading included, the first 10 steps left out) is compared with `none`'s of the same round.
The README's "in a training run" figures come from it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP = 10  # the first steps compile the fused passes and warm the allocator


def step_time(out: Path) -> float:
    """Median seconds per step of a finished run, from its metrics.jsonl windows after SKIP steps."""
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    times = [r["step_time"] for r in recs if r.get("type") == "step" and r.get("step", 0) > SKIP]
    if not times:
        raise SystemExit(f"{out}: no step records after step {SKIP}; use more --steps")
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--policies", nargs="+", default=["none", "avg2+mask", "avg2+mask+bn8", "q4+mask+bn4", "ckpt"])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    if a.steps <= SKIP + 5 or a.rounds < 1:
        ap.error(f"--steps must exceed {SKIP + 5} and --rounds be at least 1")
    policies = list(dict.fromkeys(["none", *a.policies]))
    times: dict[str, list[float]] = {p: [] for p in policies}
    ratios: dict[str, list[float]] = {p: [] for p in policies}
    with tempfile.TemporaryDirectory(prefix="poolprop-trainer-speed-") as tmp:
        for r in range(a.rounds):
            for p in policies:
                out = Path(tmp) / f"r{r}-{p}"
                cmd = [sys.executable, "-m", "core", "train", "--model", a.model, "--policy", p,
                       "--dataset", f"features10:train={a.batch * a.steps},val={a.batch}", "--epochs", "1",
                       "--steps", str(a.steps), "--batch-size", str(a.batch), "--num-threads", str(a.threads),
                       "--log-every", "5", "--fidelity-every", "0", "--out", str(out)]
                done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
                if done.returncode:
                    raise SystemExit(f"{p}: training failed:\n{done.stderr[-2000:]}")
                times[p].append(step_time(out))
                print(f"round {r + 1}: {p:18s} {1000 * times[p][-1]:6.0f} ms/step", flush=True)
            for p in policies:
                ratios[p].append(times[p][-1] / times["none"][-1])
    print(f"\n{a.model}, batch {a.batch}, {a.threads} thread(s), {a.steps} steps a run, {a.rounds} rounds "
          "(median step time; ratio to none in the same round, then its range over rounds):")
    for p in policies:
        rs = ratios[p]
        print(f"  {p:18s} {1000 * statistics.median(times[p]):6.0f} ms/step   "
              f"{statistics.median(rs):.2f}x  ({min(rs):.2f}-{max(rs):.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
