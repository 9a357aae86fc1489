"""Reading a run directory: its files (config, summary, metrics), and its weights, validated
against the model the config names (docs/training.md, The run directory).

The writer is beside it (writer.py). Weights are read with safetensors only; `.pt`/`.pth`
files are never opened (pickle runs code on load) and are reported as refused.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .paths import LOCAL_DIR, SHIPPED_DIR

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

def run_path(run) -> Path:
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
    path = run_path(run) / "config.json"
    cfg = _read_json(path)
    from ...models import is_model_name, model_names_help

    model = cfg.get("model")
    if not is_model_name(model):
        raise RunError(f"{path} names unknown model {model!r}; known: {model_names_help()}")
    if "policy" in cfg:
        from ...method import CompressionPolicy, PolicyError

        try:
            CompressionPolicy.parse(cfg["policy"])
        except PolicyError as e:
            raise RunError(f"{path}: bad policy: {e}") from None
    return cfg


def load_summary(run) -> dict | None:
    path = run_path(run) / "summary.json"
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
    path = run_path(run) / "metrics.jsonl"
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


def metrics_tail_cut(path: Path) -> bool:
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

    from ...models import build_model

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
    from ...models import build_model

    path = run_path(run)
    cfg = run.config if isinstance(run, Run) and run.config else load_config(path)
    weights = path / "model.safetensors"
    state = load_state_dict(weights, expected_state_shapes(cfg))
    model = build_model(cfg["model"], num_classes=_num_classes(cfg), stem=cfg.get("stem", "cifar"))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # dtype or other issues not seen in the header check
        raise RunError(f"{weights} does not load into {cfg['model']}: {str(e).splitlines()[0]}") from None
    if compressed and cfg.get("policy"):
        from ...method import compress_model

        compress_model(model, cfg["policy"])
    return model.to(device).eval()
