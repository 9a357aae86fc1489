"""Finding and loading runs, shipped and new, with validation (docs/training.md, The run directory).

A run is a folder written by `core.train` (config.json, metrics.jsonl, model.safetensors,
resume.*, summary.json). `list_runs` never raises for one bad run: it lists it as
`broken` with a one-line reason, so a page can show what is wrong instead of crashing.
Weights are read with safetensors only and checked against the model the config names;
`.pt`/`.pth` files are never opened (pickle runs code on load) and are reported as refused.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_DIR = ROOT / "checkpoints"
LOCAL_DIR = ROOT / "runs"
RUN_FILES = ("config.json", "metrics.jsonl", "model.safetensors", "summary.json", "resume.json")
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".ckpt", ".bin")


class RunError(ValueError):
    """A run folder or one of its files that cannot be used; the message names the file."""


@dataclass
class Run:
    path: Path
    name: str
    config: dict | None = None
    summary: dict | None = None
    status: str = "broken"  # or finished, failed, stopped, running, interrupted (a dead "running")
    reason: str | None = None  # why it is broken (one line); None otherwise
    is_shipped: bool = False
    notes: list[str] = field(default_factory=list)  # non-fatal: refused .pt files, a cut metrics line

    @property
    def ok(self) -> bool:
        return self.status != "broken"

    def to_dict(self) -> dict:
        return {"path": str(self.path), "name": self.name, "status": self.status, "reason": self.reason,
                "is_shipped": self.is_shipped, "notes": list(self.notes), "config": self.config,
                "summary": self.summary}


# ---------------------------------------------------------------------------------------
# Small readers
# ---------------------------------------------------------------------------------------

def _as_path(run) -> Path:
    return Path(run.path if isinstance(run, Run) else run)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise RunError(f"{path} not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise RunError(f"{path} is not text (not a JSON file)") from None
    except json.JSONDecodeError as e:
        raise RunError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise RunError(f"{path} should hold a JSON object, found {type(data).__name__}")
    return data


def resolve_run(ref: str | os.PathLike) -> Path:
    """A run folder from a path, or a bare name looked up in runs/ then checkpoints/."""
    p = Path(ref)
    if p.is_dir():
        return p
    if not p.is_absolute() and len(p.parts) == 1:
        for base in (LOCAL_DIR, SHIPPED_DIR):
            if (base / p).is_dir():
                return base / p
    raise FileNotFoundError(f"run {str(ref)!r} not found (neither a folder nor a run name in runs/ or checkpoints/)")


def load_config(run) -> dict:
    """config.json of a run, checked for the fields needed to rebuild its model."""
    path = _as_path(run) / "config.json"
    cfg = _read_json(path)
    from .models import MODEL_NAMES

    model = cfg.get("model")
    if model not in MODEL_NAMES:
        raise RunError(f"{path} names unknown model {model!r}; known: {', '.join(MODEL_NAMES)}")
    if "policy" in cfg:
        from .compression import CompressionPolicy, PolicyError

        try:
            CompressionPolicy.parse(cfg["policy"])
        except PolicyError as e:
            raise RunError(f"{path}: bad policy: {e}") from None
    return cfg


def load_summary(run) -> dict | None:
    path = _as_path(run) / "summary.json"
    return _read_json(path) if path.exists() else None


class MetricsLog(list):
    """The records of metrics.jsonl (a list of dicts) plus what had to be skipped.

    `skipped` holds (line number, reason) for lines that are not JSON objects, e.g. the
    last line of a run killed mid-write.
    """

    def __init__(self, records=(), skipped=()):
        super().__init__(records)
        self.skipped: list[tuple[int, str]] = list(skipped)

    def of_type(self, kind: str) -> list[dict]:
        return [r for r in self if r.get("type") == kind]

    @property
    def steps(self) -> list[dict]:
        return self.of_type("step")

    @property
    def evals(self) -> list[dict]:
        return self.of_type("eval")

    @property
    def fidelity(self) -> list[dict]:
        return self.of_type("fidelity")


def read_metrics(run) -> MetricsLog:
    """Parse metrics.jsonl, skipping (and reporting in `.skipped`) lines that do not parse."""
    path = _as_path(run) / "metrics.jsonl"
    if not path.is_file():
        return MetricsLog()
    records, skipped = [], []
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    for i, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        last = i == len(lines)  # no newline after it: the writer may have been cut off
        try:
            rec = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            skipped.append((i, "last line cut mid-write" if last else "not valid JSON"))
            continue
        if not isinstance(rec, dict):
            skipped.append((i, "not a JSON object"))
            continue
        records.append(rec)
    return MetricsLog(records, skipped)


def _metrics_tail_cut(path: Path) -> bool:
    """Cheap check: does metrics.jsonl end mid-line (no trailing newline)?"""
    try:
        size = path.stat().st_size
        if size == 0:
            return False
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) != b"\n"
    except OSError:
        return False


def pid_alive(pid, markers: tuple[bytes, ...] = (b"python", b"core")) -> bool:
    """Is `pid` running and not a zombie? Where /proc tells, its command line must also hold
    one of `markers` (none given: no check), which guards against a recycled pid."""
    try:
        pid = int(pid)
    except (TypeError, ValueError):
        return False
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    proc = Path(f"/proc/{pid}")
    if proc.exists():
        try:
            if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return False  # killed, not yet reaped
            cmdline = (proc / "cmdline").read_bytes()
            if markers and not any(m in cmdline for m in markers):
                return False
        except (OSError, IndexError):
            pass
    return True


# ---------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------

def _sniff_pickle(path: Path) -> str | None:
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return None
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive (torch.save format)"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a pickle file"
    return None


def expected_state_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """state_dict shapes of the model a config names (cached per model, classes and stem)."""
    return dict(_state_shapes(config["model"], _num_classes(config), config.get("stem", "cifar")))


@functools.lru_cache(maxsize=64)
def _state_shapes(model_name: str, num_classes: int, stem: str) -> tuple:
    # Built on the CPU, not the meta device: normal_ on meta imports torch._dynamo (~10 s once),
    # which made the first list_runs() of a process (the app's first page) that slow.
    import torch

    from .models import build_model

    with torch.no_grad():
        model = build_model(model_name, num_classes=num_classes, stem=stem)
    return tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())


def _num_classes(config: dict) -> int:
    if "num_classes" in config:
        return int(config["num_classes"])
    if isinstance(config.get("classes"), list):
        return len(config["classes"])
    return 10


def check_weights(path: Path, expected: dict[str, tuple[int, ...]]) -> None:
    """Validate a safetensors file's header (not its data) against expected shapes."""
    if not path.is_file():
        raise RunError(f"{path} not found")
    kind = _sniff_pickle(path)
    if kind:
        raise RunError(f"{path} is {kind}, not safetensors; refused (PoolProp never loads pickle)")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise RunError(f"{path} is corrupt or truncated ({str(e).splitlines()[0]})") from None
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = [f"{k} {shapes[k]} vs {expected[k]}" for k in expected if k in shapes and shapes[k] != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} keys (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
    if wrong:
        problems.append(f"{len(wrong)} shape mismatches (e.g. {'; '.join(wrong[:2])})")
    if problems:
        raise RunError(f"{path} does not fit the model in config.json: " + ", ".join(problems))


def load_state_dict(path: Path, expected: dict[str, tuple[int, ...]] | None = None, device="cpu") -> dict:
    """Read weights with safetensors only; validate against `expected` shapes first."""
    path = Path(path)
    if expected is not None:
        check_weights(path, expected)
    elif not path.is_file():
        raise RunError(f"{path} not found")
    elif _sniff_pickle(path):
        raise RunError(f"{path} is {_sniff_pickle(path)}, not safetensors; refused (PoolProp never loads pickle)")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise RunError(f"{path} is corrupt or truncated ({str(e).splitlines()[0]})") from None


def load_model(run, device="cpu", compressed: bool = False):
    """The model a run's config names, with its weights from model.safetensors, in eval mode.

    The plain model is returned (forward is exact whatever the policy); `compressed=True`
    applies the run's policy too (for gradient views). Raises RunError on any mismatch.
    """
    from .models import build_model

    path = _as_path(run)
    cfg = run.config if isinstance(run, Run) and run.config else load_config(path)
    weights = path / "model.safetensors"
    state = load_state_dict(weights, expected_state_shapes(cfg))
    model = build_model(cfg["model"], num_classes=_num_classes(cfg), stem=cfg.get("stem", "cifar"))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # dtype or other issues not seen in the header check
        raise RunError(f"{weights} does not load into {cfg['model']}: {str(e).splitlines()[0]}") from None
    if compressed and cfg.get("policy"):
        from .compression import compress_model

        compress_model(model, cfg["policy"])
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------
# Listing
# ---------------------------------------------------------------------------------------

def _is_run_dir(p: Path) -> bool:
    return p.is_dir() and any((p / f).exists() for f in RUN_FILES)


def run_folders(base: Path) -> list[Path]:
    """The runs in `base`: base itself if it is a run, else the runs in it and, one level down,
    in its folders that are not runs (a group such as runs/shipped/, where the retraining
    script writes). Hidden folders (runs/.launcher) are skipped."""
    if _is_run_dir(base):
        return [base]
    found = []
    for child in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if _is_run_dir(child):
            found.append(child)
            continue
        try:
            found += sorted(p for p in child.iterdir() if _is_run_dir(p))
        except OSError:  # an unreadable folder beside the runs hides nothing else
            pass
    return found


def inspect_run(path: str | os.PathLike, is_shipped: bool = False) -> Run:
    """Read one run folder into a Run; never raises (a bad run comes back `broken`)."""
    path = Path(path)
    run = Run(path=path, name=path.name, is_shipped=is_shipped)
    try:
        for f in sorted(path.iterdir()):
            if f.suffix.lower() in PICKLE_SUFFIXES:
                run.notes.append(f"ignored {f.name}: pickle checkpoints are refused (safetensors only)")
        run.config = load_config(path)
        run.summary = load_summary(path)
        status = (run.summary or {}).get("status")
        if status == "running":
            status = "running" if pid_alive(run.summary.get("pid")) else "interrupted"
            if status == "interrupted":
                run.notes.append("summary says running but its process is gone")
        elif status not in ("finished", "failed", "stopped"):
            status = "interrupted"
            if run.summary is None:
                run.notes.append("no summary.json")
        weights = path / "model.safetensors"
        if weights.exists() or status in ("finished", "stopped") or is_shipped:
            check_weights(weights, expected_state_shapes(run.config))
        if _metrics_tail_cut(path / "metrics.jsonl"):
            run.notes.append("metrics.jsonl: last line cut mid-write (skipped when read)")
        run.status = status
    except RunError as e:
        run.status, run.reason = "broken", str(e).replace(str(path) + "/", "")
    except Exception as e:  # noqa: BLE001 - listing must survive anything one run throws
        run.status, run.reason = "broken", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return run


def _same_run_key(r: Run) -> tuple | None:
    """What two folders holding the same run share: name, start time and how far it got
    (a copy trained on further differs)."""
    if not (r.config or {}).get("created"):
        return None
    s = r.summary or {}
    return r.name, r.config["created"], s.get("status"), s.get("epochs_done"), s.get("last_val_acc")


def default_dirs() -> list[Path]:
    return [SHIPPED_DIR, LOCAL_DIR]


def list_runs(dirs=None, include_default: bool = True) -> list[Run]:
    """Runs found in checkpoints/ (shipped), runs/ (local) and `dirs` (folders of runs, or runs),
    one level of group folders deep (`run_folders`).

    Sorted shipped first, then newest first. Missing folders are skipped silently. A copy of a
    run (the same run, as `train_shipped.py --collect` leaves one in runs/shipped/ and one in
    checkpoints/) is listed once, the shipped one kept.
    """
    bases = (default_dirs() if include_default or dirs is None else []) + [Path(d) for d in (dirs or [])]
    seen: set[Path] = set()
    runs: list[Run] = []
    for base in bases:
        if not base.is_dir():
            continue
        shipped = base.resolve() == SHIPPED_DIR.resolve()
        for p in run_folders(base):
            key = p.resolve()
            if key in seen:
                continue
            seen.add(key)
            runs.append(inspect_run(p, is_shipped=shipped))
    kept, copies = [], set()
    for r in sorted(runs, key=lambda r: not r.is_shipped):  # the shipped copy of a run wins
        same = _same_run_key(r)
        if same not in copies:
            kept.append(r)
            copies.add(same or r.path)

    def order(r: Run):
        try:
            mtime = max((r.path / f).stat().st_mtime for f in RUN_FILES if (r.path / f).exists())
        except (OSError, ValueError):
            mtime = 0.0
        return (not r.is_shipped, -mtime, r.name)

    return sorted(kept, key=order)


def dataset_label(name) -> str:
    """'features10', 'cifar10', or an image folder by its last meaningful parts ('cifar/train')."""
    name = str(name or "?")
    if not name.startswith("imagefolder:"):
        return name
    parts = Path(name.split(":", 1)[1].rstrip("/\\")).parts
    keep = parts[-2:] if parts and parts[-1].lower() in ("train", "val", "test", "images", "data") else parts[-1:]
    return "/".join(keep) or "imagefolder"


def run_labels(runs: list[Run]) -> dict[str, str]:
    """Run folder -> a short unique display name: 'avg2+mask · features10', with the model, the
    epochs ('· 30 ep') and the seed only when the runs differ in them (then on every name, so a
    legend reads alike); runs still alike get their start time, then their folder. The app's
    legends and `core report` both use it. A run listed twice gets one name."""
    runs = list({str(r.path): r for r in runs}.values())
    cfgs = {str(r.path): (r.config or {}) for r in runs}
    models = {c.get("model") for c in cfgs.values() if c}
    epochs = {c.get("epochs") for c in cfgs.values() if c}
    seeds = {c.get("seed", 0) for c in cfgs.values() if c}

    def short(r: Run) -> str:
        c = cfgs[str(r.path)]
        if not c.get("model"):
            return r.name
        text = (f"{c['model']} " if len(models) > 1 else "") + f"{c.get('policy', 'none')} · "
        text += dataset_label(c.get("dataset"))
        text += f" · {c['epochs']} ep" if len(epochs) > 1 and c.get("epochs") else ""
        return text + (f" · s{c.get('seed', 0)}" if len(seeds) > 1 else "")

    base = {str(r.path): short(r) for r in runs}
    for extra in ("time", "folder"):  # still alike: the start time, then the folder
        count = Counter(base.values())
        alike = [r for r in runs if count[base[str(r.path)]] > 1]
        names = Counter(r.name for r in alike)
        for r in alike:
            key = str(r.path)
            when = str(cfgs[key].get("created", ""))[11:19]
            if extra == "time" and when:
                base[key] += f" · {when}"
            elif extra == "folder":  # with the folder above it where two folders share a name
                base[key] += f" ({r.name})" if names[r.name] == 1 else f" ({r.path.parent.name}/{r.name})"
    return base


def run_mtime_key(run) -> float:
    """mtime of model.safetensors (0.0 when absent): a cache key that changes with the weights."""
    try:
        return (_as_path(run) / "model.safetensors").stat().st_mtime
    except OSError:
        return 0.0


# ---------------------------------------------------------------------------------------
# CLI: python -m core runs
# ---------------------------------------------------------------------------------------

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
                     f"{s.get('epochs_done', '-')}/{cfg.get('epochs', '-')}", _fmt_acc(s.get("last_val_acc")), note))
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


if __name__ == "__main__":  # pragma: no cover
    from .__main__ import main

    sys.exit(main(["runs", *sys.argv[1:]]))
