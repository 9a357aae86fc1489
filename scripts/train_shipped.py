"""Retrain the shipped checkpoints: one command, CPU or GPU.

    python scripts/train_shipped.py --cifar PATH/train --out-root runs/shipped --jobs 1     # CPU
    python scripts/train_shipped.py --cifar PATH/train --out-root runs/shipped --jobs 14    # one GPU

PATH/train is the CIFAR-10 JPEG ImageFolder (../shared/data, unzipped); its validation split
is the fixed one of core.engine.data (images 4500-4999 of each class). Runs start in priority order
(the issue's list), `--jobs` at a time; on a GPU several small ResNet-20 processes share the
card well because each one is bound by kernel launches. `--deadline` stops (SIGTERM: status
"stopped", last epoch kept) whatever has not finished, so a time-boxed machine still returns
everything. Only the standard library is imported here: each run is a process of PoolProp's job runner
(`python -m core.engine.jobs --config JSON`, the one the app's launcher uses).
Run it again after an interruption and it carries on: finished runs are skipped, runs with
a completed epoch continue with `--resume`, runs cut before their first epoch start afresh.
`--dry-run` lists what a command line would train, in order, and where each run stands in
--out-root (starts afresh, resumes after epoch N, finished), without changing anything. Then:
`python scripts/train_shipped.py --collect runs/shipped` copies finished runs into
checkpoints/ without their resume state.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# One recipe for every CIFAR run (README: "The shipped checkpoints"), as TrainConfig settings.
RECIPE = {"model": "resnet20", "batch_size": 256, "optimizer": "sgd", "lr": 0.2, "schedule": "onecycle",
          "weight_decay": 5e-4, "label_smoothing": 0.1, "log_every": 20, "fidelity_every": 200, "progress": False}
FEATURES_RECIPE = {"model": "resnet20", "dataset": "features10", "batch_size": 128, "num_threads": 1,
                   "log_every": 10, "fidelity_every": 50, "progress": False}


def plan(epochs: int, long_epochs: int, features_epochs: int) -> list[tuple[str, str, dict]]:
    """(run name, priority, extra settings) in the order to start them."""
    runs = []

    def cifar(policy, ep, seed=0, prio="1"):
        runs.append((f"r20-cifar-{policy}-e{ep}-s{seed}", prio, {"policy": policy, "epochs": ep, "seed": seed}))

    for p in ("none", "avg2+mask", "avg4+mask"):
        cifar(p, epochs, prio="1")
    for p in ("avg2+mask", "avg4+mask", "none"):  # `none` too: does the longer schedule help only the compressed?
        cifar(p, long_epochs, prio="2 longer schedule")
    for p in ("max2+mask", "avg2-lowres+mask", "avg8+mask", "avg2+mask+bn8"):
        cifar(p, epochs, prio="3")
    for p in ("none", "avg2+mask"):
        cifar(p, epochs, seed=1, prio="4 second seed")
    # compression families (quantised codes): the >= 10x policy with two seeds, the near-exact
    # >= 6x one with one; and avg2+mask at the length where the baseline has converged
    for p, seeds in (("q2+mask+bn2", (0, 1)), ("q4+mask+bn4", (0,))):
        for seed in seeds:
            cifar(p, epochs, seed=seed, prio="5 families")
    if not any(name == "r20-cifar-avg2+mask-e60-s0" for name, _, _ in runs):
        cifar("avg2+mask", 60, prio="6 converged schedule")
    for p in ("none", "avg2+mask", "avg4+mask", "avg8+mask"):
        runs.append((f"r20-features10-{p}-e{features_epochs}-s0", "features10",
                     {"dataset": "features10", "policy": p, "epochs": features_epochs, "seed": 0}))
    return runs


def select_runs(args) -> list[tuple[str, str, dict]]:
    """The plan less what the flags leave out: CIFAR runs without --cifar, names that match no
    --only substring, runs already shipped (--missing-only)."""
    return [r for r in plan(args.epochs, args.long_epochs, args.features_epochs)
            if (args.cifar or "features10" in r[0]) and (not args.only or any(o in r[0] for o in args.only))
            and not (args.missing_only and is_finished(ROOT / "checkpoints" / r[0]))]


def launch(args) -> int:
    out_root = Path(args.out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    threads = {"num_threads": args.num_threads} if args.num_threads else {}
    smoke = {"steps": args.smoke_steps, "train_subset": 512, "val_subset": 256} if args.smoke_steps else {}
    common = {"device": args.device, **threads, **smoke}
    if args.cifar:  # decode the JPEGs once into the uint8 cache before the runs start in parallel
        subprocess.run([sys.executable, "-c", "import sys; from core.engine.data import load_dataset; "
                        "d = load_dataset(sys.argv[1]); print('data', d.train_x.shape, d.val_x.shape)",
                        f"imagefolder:{args.cifar}"], cwd=ROOT, env=env, check=True)
    todo = select_runs(args)
    start, running = time.time(), {}
    while todo or running:
        while todo and len(running) < args.jobs:
            name, prio, extra = todo.pop(0)
            data = {} if "features10" in name else {"dataset": f"imagefolder:{args.cifar}"}
            recipe = FEATURES_RECIPE if "features10" in name else RECIPE
            where = where_to_write(out_root / name)
            if where == "finished":
                print(f"[{time.time() - start:6.0f}s] skip  {name} (finished)", flush=True)
                continue
            settings = {**recipe, **data, **extra, **common}
            cmd = [sys.executable, "-m", "core.engine.jobs"]
            if where[0] == "resume":
                cmd += ["--resume", where[1]]
            else:
                settings["out"] = where[1]
            cmd += ["--config", json.dumps(settings)]
            log = open(out_root / f"{name}.log", "a")
            running[name] = (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log)
            print(f"[{time.time() - start:6.0f}s] start {name} (priority {prio})", flush=True)
        for name, (proc, log) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                del running[name]
                print(f"[{time.time() - start:6.0f}s] done  {name} rc={proc.returncode}", flush=True)
        if args.deadline and time.time() - start > args.deadline:
            print(f"deadline: stopping {len(running)} runs, not starting {len(todo)}", flush=True)
            for proc, _ in running.values():
                proc.send_signal(signal.SIGTERM)
            for proc, log in running.values():
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                log.close()
            break
        time.sleep(1)
    print_table(out_root)
    return 0


def is_finished(run_dir: Path) -> bool:
    summary = run_dir / "summary.json"
    return summary.exists() and json.loads(summary.read_text()).get("status") == "finished"


def stands(run_dir: Path) -> str:
    """'finished', 'resumable' (a completed epoch left its resume state) or 'new'."""
    if is_finished(run_dir):
        return "finished"
    return "resumable" if (run_dir / "resume.safetensors").exists() else "new"


def progress(run_dir: Path) -> str:
    """What a launch would do with this run folder, for --dry-run (read-only: changes nothing)."""
    state = stands(run_dir)
    if state == "finished":
        return "finished there: skipped"
    if state == "new":
        return "starts afresh"
    try:
        done = json.loads((run_dir / "resume.json").read_text())["epoch"]
        total = json.loads((run_dir / "config.json").read_text())["epochs"]
    except (OSError, ValueError, KeyError, TypeError):
        return "resumes (its epoch count is unreadable; `core train --resume` will say why)"
    return f"resumes after epoch {done} of {total}"


def where_to_write(run_dir: Path) -> tuple[str, str] | str:
    """("out", DIR) for a new run, ("resume", DIR) for one with a completed epoch, or
    "finished" for one that is done. A folder cut before its first epoch is cleared."""
    state = stands(run_dir)
    if state == "finished":
        return "finished"
    if state == "resumable":
        return ("resume", str(run_dir))
    shutil.rmtree(run_dir, ignore_errors=True)
    return ("out", str(run_dir))


def print_table(out_root: Path) -> None:
    print(f"{'run':42s} {'status':9s} {'epochs':>7s} {'best acc':>8s} {'last acc':>8s} {'wall':>7s}")
    for summary_path in sorted(out_root.glob("*/summary.json")):
        s = json.loads(summary_path.read_text())
        best, last = s.get("best_val_acc"), s.get("last_val_acc")
        print(f"{summary_path.parent.name:42s} {s.get('status', '?'):9s} "
              f"{s.get('epochs_done', 0):>3}/{s.get('epochs', 0):<3} "
              f"{best if best is None else f'{best:.4f}':>8} {last if last is None else f'{last:.4f}':>8} "
              f"{s.get('wall_s', 0):6.0f}s")


def _relative_to(root: Path, value):
    """A path inside `root` ('imagefolder:PATH' too) as root-relative; anything else unchanged."""
    if not isinstance(value, str):
        return value
    prefix = "imagefolder:" if value.startswith("imagefolder:") else ""
    path = Path(value[len(prefix):])
    if not path.is_absolute() or not path.resolve().is_relative_to(root.resolve()):
        return value
    return prefix + path.resolve().relative_to(root.resolve()).as_posix()


def collect(src: Path, dest: Path, root: Path = ROOT) -> int:
    """Copy finished runs into checkpoints/ (weights, config, metrics, summary; no resume state).
    Paths inside the repository (the data set, the run folder) are stored relative to it, as a
    fresh clone needs them and as the runs of one recipe must compare equal. A run already
    shipped is left as it is (shipped files may have been amended since): delete it from
    checkpoints/ to replace it."""
    dest.mkdir(parents=True, exist_ok=True)
    for run in sorted(p.parent for p in src.glob("*/summary.json")):
        status = json.loads((run / "summary.json").read_text()).get("status")
        target = dest / run.name
        if status != "finished" or target.exists():
            print(f"skip {run.name}: {'already shipped' if target.exists() else status}")
            continue
        tmp = dest / f".{run.name}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for f in ("metrics.jsonl", "model.safetensors"):
            shutil.copy2(run / f, tmp / f)
        for f in ("config.json", "summary.json"):
            d = json.loads((run / f).read_text())
            d = {k: _relative_to(root, v) if k in ("dataset", "data_dir", "out") else v for k, v in d.items()}
            (tmp / f).write_text(json.dumps(d, indent=2) + "\n")
        tmp.rename(target)  # whole or not at all
        print(f"shipped {run.name}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cifar", help="ImageFolder root of the CIFAR-10 JPEG training split (omit: features10 only)")
    p.add_argument("--out-root", default="runs/shipped")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time")
    p.add_argument("--device", default="auto")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--long-epochs", type=int, default=30, help="the 1.5x 'longer schedule' runs")
    p.add_argument("--num-threads", type=int, default=0, help="CPU threads per run (default: torch's)")
    p.add_argument("--features-epochs", type=int, default=4)
    p.add_argument("--deadline", type=float, default=0, help="seconds; then stop what still runs")
    p.add_argument("--only", nargs="*", help="substrings of run names to train")
    p.add_argument("--missing-only", action="store_true", help="skip runs already shipped in checkpoints/")
    p.add_argument("--smoke-steps", type=int, default=0, help="tiny runs to test this script")
    p.add_argument("--dry-run", action="store_true", help="list the runs it would train, in order, and stop")
    p.add_argument("--collect", metavar="SRC", help="copy finished runs from SRC into checkpoints/")
    args = p.parse_args()
    if args.collect:
        return collect(Path(args.collect), ROOT / "checkpoints")
    if args.dry_run:
        for name, prio, _ in select_runs(args):
            print(f"{name:42s} priority {prio:22s} {progress(Path(args.out_root) / name)}")
        return 0
    return launch(args)


if __name__ == "__main__":
    sys.exit(main())
