"""What every page shares: the run picker, cached loaders, figure/CSV output, messages.

Pages stay thin: widgets -> a core call (through the cached loaders here) -> a figure from
core/plots.py. Nothing here trains; the Train page goes through core/launcher.py.

Where runs come from (core.runs.list_runs):
    default                      checkpoints/ (shipped) and runs/ (made here), each with one
                                 level of group folders (runs/shipped/<run>)
    POOLPROP_RUN_DIRS=A:B        only these folders (of runs, or runs themselves): tests, demos
    POOLPROP_RUNS_ROOT=DIR       where the Train page writes new runs and its queue (default runs/);
                                 always listed too

Caching: models in st.cache_resource keyed by run folder + the mtime of
model.safetensors (shared between sessions: treat them as read-only, deep-copy before
anything that swaps layers); images, metrics and run lists in st.cache_data.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import re
from pathlib import Path

import numpy as np
import streamlit as st
import torch

from core import plots
from core.launcher import Launcher, device_key
from core.report import rows_to_csv
from core.runs import (
    LOCAL_DIR,
    Run,
    RunError,
    dataset_label,
    list_runs,
    load_model,
    read_metrics,
    run_folders,
    run_labels,
    run_mtime_key,
)

ENV_RUN_DIRS = "POOLPROP_RUN_DIRS"
ENV_RUNS_ROOT = "POOLPROP_RUNS_ROOT"
SELECTED = "selected_runs"  # session_state: list of run folder paths, shared by every page
PICKER_KEY = "_run_picker"
MAX_SELECTED = 6
PLOT_CONFIG = {"displaylogo": False, "modeBarButtonsToRemove": ["lasso2d", "select2d"]}


# =======================================================================================
# Where runs are
# =======================================================================================

def runs_root() -> Path:
    """Folder for new runs and the launcher's queue."""
    env = os.environ.get(ENV_RUNS_ROOT)
    return Path(env) if env else LOCAL_DIR


def run_dirs() -> tuple[list[str], bool]:
    """(folders to list, include the defaults checkpoints/ + runs/)."""
    env = os.environ.get(ENV_RUN_DIRS)
    extra = [str(runs_root())] if os.environ.get(ENV_RUNS_ROOT) else []
    if env:
        return [d for d in env.split(os.pathsep) if d] + extra, False
    return extra, True


def _signature(dirs: list[str], include_default: bool) -> tuple:
    """Cheap fingerprint of the run folders (names + mtimes of the small files) for the cache key."""
    from core.runs import default_dirs

    bases = ([str(d) for d in default_dirs()] if include_default else []) + list(dirs)
    sig = []
    for base in bases:
        try:
            entries = [base] + [str(p) for p in run_folders(Path(base))]
        except OSError:
            continue
        for d in entries:
            for f in ("config.json", "summary.json", "model.safetensors"):
                try:
                    sig.append((d, f, os.stat(os.path.join(d, f)).st_mtime_ns))
                except OSError:
                    pass
    state = runs_root() / ".launcher"
    with contextlib.suppress(OSError):
        sig += [(p.name, p.stat().st_mtime_ns) for p in state.glob("*.json")]
    return tuple(sig)


@st.cache_data(ttl=60, max_entries=8, show_spinner=False)
def _runs_cached(dirs: tuple, include_default: bool, signature: tuple) -> list[Run]:
    return list_runs(list(dirs), include_default=include_default)


def all_runs() -> list[Run]:
    """Every run found, broken ones included (their `reason` says why)."""
    dirs, include_default = run_dirs()
    return _runs_cached(tuple(dirs), include_default, _signature(dirs, include_default))


def usable_runs() -> list[Run]:
    return [r for r in all_runs() if r.ok]


def _all_labels(extra: list[Run] = ()) -> dict[str, str]:
    """Display names made unique over every run on disk (so a name never changes with the selection)."""
    return run_labels([*all_runs(), *extra])


def label_of(run: Run) -> str:
    return _all_labels([run])[str(run.path)]


def names_of(runs: list[Run]) -> list[str]:
    d = _all_labels(runs)
    return [d[str(r.path)] for r in runs]


def colors_for(runs: list[Run]) -> dict[str, str]:
    """Display name -> colour; the colour comes from the run's folder name, resolved over all runs
    on disk, so a run keeps its colour on every page whatever else is selected."""
    cmap = plots.color_map([r.name for r in all_runs()] + [r.name for r in runs])
    d = _all_labels(runs)
    out = {d[str(r.path)]: cmap[r.name] for r in runs}
    # more runs on disk than colours: two selected runs may share one; give the later ones
    # (in name order, so deterministically) a colour no selected run has
    if len(set(out.values())) < len(out):
        taken: set[str] = set()
        for label in sorted(out):
            if out[label] in taken:
                free = [c for c in plots.PALETTE if c not in taken and c not in out.values()]
                out[label] = free[0] if free else out[label]
            taken.add(out[label])
    return out


def default_selection(runs: list[Run], n: int = 3) -> list[str]:
    """A sensible start: the largest group of runs sharing model and dataset (shipped first, real
    images before the built-in set), then one run per policy - baseline first, then the compressed
    policies the paper is about - each from the group's usual schedule, so the curves compare."""
    ok = [r for r in runs if r.ok and (r.path / "model.safetensors").exists()] or [r for r in runs if r.ok]
    if not ok:
        return []
    groups: dict[tuple, list[Run]] = {}
    for r in ok:
        cfg = r.config or {}
        groups.setdefault((cfg.get("model"), cfg.get("dataset")), []).append(r)

    def real_images(g: list[Run]) -> bool:
        return not str((g[0].config or {}).get("dataset", "")).startswith("features10")

    best = max(groups.values(), key=lambda g: (len(g) >= 2, any(r.is_shipped for r in g), real_images(g), len(g)))
    epochs = [(r.config or {}).get("epochs") for r in best]
    usual = max(set(epochs), key=lambda e: (epochs.count(e), -(e or 0)))  # the shorter one on a tie
    preference = ["none", "avg2+mask", "avg4+mask", "avg2+mask+bn8"]

    def rank(r: Run):
        cfg = r.config or {}
        pol = str(cfg.get("policy", ""))
        return (preference.index(pol) if pol in preference else len(preference), cfg.get("epochs") != usual,
                not r.is_shipped, r.name)

    ordered = sorted(best, key=rank)
    first_of_policy: dict = {}
    for r in ordered:
        first_of_policy.setdefault((r.config or {}).get("policy"), r)
    picked = list(first_of_policy.values()) + [r for r in ordered if r not in first_of_policy.values()]
    return [str(r.path) for r in picked[:n]]


# =======================================================================================
# Page frame: title, run picker, status
# =======================================================================================

def _run_through_navigation() -> None:
    """Make sure the page runs inside app.py's st.navigation. A server whose first visitor comes
    straight to a page's URL (/Memory) runs the file from pages/ the old multipage way, without
    app.py: the sidebar then lists "app" and keeps doing so until someone opens the home page.
    Switching that mode off and rerunning lets app.py route the same URL (a Streamlit internal,
    hence the guards; nothing happens where it is missing)."""
    try:
        from streamlit.runtime.pages_manager import PagesManager
    except ImportError:
        return
    if getattr(PagesManager, "uses_pages_directory", False):
        PagesManager.uses_pages_directory = False
        st.rerun()


def page(title: str, intro: str | None = None) -> list[Run]:
    """Page config, the title, the sidebar (run picker + device/training status).
    Returns the selected runs (usable ones, in the order picked)."""
    _run_through_navigation()
    st.set_page_config(page_title=f"{title} · PoolProp" if title != "PoolProp" else title, layout="wide")
    st.title(title)
    if intro:
        st.caption(intro)
    selected = run_picker()
    with st.sidebar:
        status_panel()
    return selected


def keep(key: str, default) -> None:
    """Make the widget with `key` keep its value across page switches (Streamlit drops a widget's
    state when a run of another page does not draw it). Call just before creating the widget,
    and create it without a default value of its own (no index=/value=): the value comes from
    st.session_state[key], restored here from a copy that outlives the widget."""
    store = f"_kept_{key}"
    if key not in st.session_state:
        st.session_state[key] = st.session_state.get(store, default)
    st.session_state[store] = st.session_state[key]


def _sync_picker() -> None:
    st.session_state[SELECTED] = list(st.session_state.get(PICKER_KEY, []))


def run_picker() -> list[Run]:
    """Sidebar multiselect of runs; the choice lives in st.session_state[SELECTED] (all pages)."""
    runs = usable_runs()
    by_path = {str(r.path): r for r in runs}
    names = _all_labels(runs)
    if SELECTED not in st.session_state:
        st.session_state[SELECTED] = default_selection(runs)
    chosen = list(st.session_state[SELECTED])
    gone = [p for p in chosen if p not in by_path]
    if gone:
        st.sidebar.warning("No longer available (deleted or damaged): " + ", ".join(Path(p).name for p in gone))
        chosen = [p for p in chosen if p in by_path]
        st.session_state[SELECTED] = chosen
    st.session_state[PICKER_KEY] = chosen  # set before the widget exists: allowed, and survives page switches
    st.sidebar.multiselect("Runs", list(by_path), key=PICKER_KEY, format_func=lambda p: names.get(p, p),
                           on_change=_sync_picker, max_selections=MAX_SELECTED,
                           help="The runs every page compares. Each keeps its colour everywhere.")
    if not runs:
        st.sidebar.info("No runs yet: train one on the Train page.")
    return [by_path[p] for p in st.session_state[SELECTED] if p in by_path]


@st.cache_resource(show_spinner=False)
def device_label() -> str:
    if torch.cuda.is_available():
        return f"GPU · {torch.cuda.get_device_name(0)}"
    return f"CPU · {torch.get_num_threads()} threads · no GPU"


def launcher() -> Launcher:
    return Launcher(runs_root())


def live_progress(run_dir) -> dict:
    """Where a run is: {"step", "total_steps", "epoch", "epochs", "status"} from its config.json,
    summary.json and the last lines of metrics.jsonl (no full read)."""
    run_dir = Path(run_dir)
    out = {"step": 0, "total_steps": None, "epoch": 0, "epochs": None, "status": None}
    for name in ("config.json", "summary.json"):
        with contextlib.suppress(OSError, ValueError):
            d = json.loads((run_dir / name).read_text())
            out["total_steps"] = d.get("total_steps", out["total_steps"])
            out["epochs"] = d.get("epochs", out["epochs"])
            if name == "summary.json":
                out["status"] = d.get("status")
                out["step"] = d.get("steps", 0) or 0
                out["epoch"] = d.get("epochs_done", 0) or 0
    for rec in reversed(_tail_records(run_dir / "metrics.jsonl")):
        if rec.get("type") == "step":
            out["step"] = max(out["step"], int(rec.get("step", 0)))
            break
    return out


def _tail_records(path: Path, nbytes: int = 8192) -> list[dict]:
    """The records in the last `nbytes` of a metrics.jsonl (all of them in a shorter file)."""
    try:
        with open(path, "rb") as f:
            start = max(0, f.seek(0, os.SEEK_END) - nbytes)
            f.seek(start)
            lines = f.read().split(b"\n")
    except OSError:
        return []
    if start > 0:
        lines = lines[1:]  # the first line read is cut: it began before `start`
    out = []
    for ln in lines:
        with contextlib.suppress(ValueError):
            rec = json.loads(ln)
            if isinstance(rec, dict):
                out.append(rec)
    return out


def progress_fraction(p: dict) -> float:
    total = p.get("total_steps") or 0
    return min(1.0, p["step"] / total) if total else 0.0


@st.fragment(run_every=5)
def status_panel() -> None:
    """Device and training status (polled every 5 s; reads the launcher's queue on disk, else
    the runs listed, for a run started from the command line or by scripts/train_shipped.py)."""
    st.markdown(f"**Device** · {device_label()}")
    try:
        jobs = launcher().jobs(device_key("auto"))
    except OSError as e:
        st.caption(f"Training queue unreadable: {e}")
        return
    running = [j for j in jobs if j.state == "running"]
    queued = [j for j in jobs if j.state == "queued"]
    if running:
        p = live_progress(running[0].run_dir)
        st.markdown(f"**Training** · {running[0].label}")
        st.progress(progress_fraction(p), text=f"step {p['step']} of {p['total_steps'] or '?'}")
    elif outside := [r for r in all_runs() if r.status == "running"]:
        p = live_progress(outside[0].path)
        st.markdown(f"**Training** · {label_of(outside[0])} (started outside the app)")
        st.progress(progress_fraction(p), text=f"epoch {p['epoch']} of {p['epochs'] or '?'}, "
                                               f"step {p['step']} of {p['total_steps'] or '?'}")
        if len(outside) > 1:
            st.caption(f"and {len(outside) - 1} more")
    else:
        st.markdown("**Training** · none running")
    if queued:
        st.caption(f"{len(queued)} queued")


# =======================================================================================
# Cached loaders
# =======================================================================================

@st.cache_resource(max_entries=12, show_spinner=False)
def _model_cached(path: str, mtime: float):
    return load_model(path)


def model_of(run: Run, private: bool = False):
    """The run's model (eval mode, plain layers). Shared between sessions: pass private=True
    for a copy you may modify (compress, train mode) or hook (a few ms for ResNet-20)."""
    path = Path(run.path)
    if not path.is_dir():
        raise RunError(f"the run folder {path.name} is gone (deleted?)")
    if not (path / "model.safetensors").exists():
        raise RunError(f"{path.name} has no weights yet (model.safetensors is written at the end of each epoch)")
    model = _model_cached(str(path), run_mtime_key(run))
    return copy.deepcopy(model) if private else model


@st.cache_data(max_entries=64, show_spinner=False)
def _metrics_cached(path: str, mtime_ns: int, size: int) -> list[dict]:
    return list(read_metrics(path))


def metrics_of(run) -> list[dict]:
    """Records of a run's metrics.jsonl (re-read only when the file changed)."""
    path = Path(getattr(run, "path", run))
    try:
        st_ = (path / "metrics.jsonl").stat()
    except OSError:
        return []
    return _metrics_cached(str(path), st_.st_mtime_ns, st_.st_size)


FEATURES10 = "features10"


@st.cache_data(max_entries=32, show_spinner=False)
def builtin_images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """n fresh images of the built-in features10 set (offline, fast): uint8 (n, 3, 32, 32), labels, classes."""
    from core.data import FEATURES10_CLASSES, generate_features10

    x, y = generate_features10(n, seed=10_000 + seed)
    return x.numpy(), y.numpy(), [c["name"] for c in FEATURES10_CLASSES]


def _features10_heldout_name(dataset: str, n: int) -> str:
    """features10[:opts] -> the same set asking for 1 training and n validation images.

    Validation images come from their own random stream, so these are held-out images of the
    run's own distribution without generating the whole training set (12,000 images, ~10 s)."""
    _, _, opts = dataset.partition(":")
    keep = [o for o in opts.split(",") if o.strip() and not o.strip().startswith(("train=", "val="))]
    return "features10:" + ",".join(["train=1", f"val={n}", *keep])


@st.cache_data(max_entries=32, show_spinner=False)
def heldout_images(dataset: str, n: int, split_seed: int = 0, seed: int = 0
                   ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """n validation images of a run's dataset: uint8 (n, 3, H, W), labels, classes; another
    `seed`, other images. Never downloads; raises core.data.DatasetError when the data is not on
    this machine."""
    from core.data import load_dataset, sample_images

    if dataset.split(":", 1)[0].strip().lower() == FEATURES10:
        # image set `seed` is the seed-th run of n images further along the validation stream
        d = load_dataset(_features10_heldout_name(dataset, n * (seed + 1)), split_seed=split_seed, download=False)
        return d.val_x[n * seed:].numpy(), d.val_y[n * seed:].numpy(), list(d.classes)
    x, y, classes = sample_images(dataset, n, split="val", seed=seed, split_seed=split_seed)
    return x.numpy(), y.numpy(), classes


def run_images(run: Run, n: int, seed: int = 0):
    cfg = run.config or {}
    return heldout_images(str(cfg.get("dataset", FEATURES10)), n, int(cfg.get("split_seed", 0)), seed)


def pick_images(run: Run | None, n: int, seed: int = 0):
    """(uint8 images, labels, classes, problem): validation images of `run`'s dataset, or the
    built-in set when run is None or its data is not on this machine (`problem` then says so)."""
    if run is not None:
        try:
            return (*run_images(run, n, seed), None)
        except Exception as e:  # noqa: BLE001 - missing data must not break a page
            return (*builtin_images(n, seed), f"The run's dataset is not available here ({one_line(e)}); "
                                              "showing the built-in set instead.")
    return (*builtin_images(n, seed), None)


@st.cache_resource(show_spinner=False)
def _untrained_cached(name: str):
    from core.models import build_model

    with torch.random.fork_rng(devices=[]):  # leave the global RNG alone
        torch.manual_seed(0)
        return build_model(name).eval()


def untrained_model(name: str = "resnet20"):
    """A freshly initialised model (seed 0) for when no run is selected (a private copy)."""
    return copy.deepcopy(_untrained_cached(name))


def to_input(x_uint8, run: Run | None) -> torch.Tensor:
    """uint8 images (n, 3, H, W) -> the normalised float batch the run's model was trained on."""
    from core.data import normalize

    return normalize(torch.as_tensor(np.asarray(x_uint8)), *_stats(run))


class PixelInput(torch.nn.Module):
    """A run's model taking images in [0, 1]: it applies the run's own normalisation first.

    Lets models trained with different normalisations (say features10 generated with other
    settings) see one shared batch of pixels, e.g. for attributions and CKA. The wrapped model
    is the shared cached one (read-only); its layers are named "net.<name>"."""

    def __init__(self, model, mean, std):
        super().__init__()
        self.net = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x):  # (B, 3, H, W) in [0, 1]
        return self.net((x - self.mean) / self.std)


def _stats(run: Run | None):
    cfg = (run.config or {}) if run is not None else {}
    return cfg.get("mean") or (0.5, 0.5, 0.5), cfg.get("std") or (0.25, 0.25, 0.25)


def pixel_model(run: Run) -> PixelInput:
    """The run's model taking [0, 1] pixels; a private copy, since attribution and CKA install
    hooks (removed afterwards, but another session could run the shared one meanwhile)."""
    return PixelInput(model_of(run, private=True), *_stats(run))


def to_pixels(x_uint8) -> torch.Tensor:
    """uint8 (n, 3, H, W) -> float (n, 3, H, W) in [0, 1] (the input of `pixel_model`)."""
    return torch.as_tensor(np.asarray(x_uint8)).float() / 255.0


def mean_image(run: Run | None, like: torch.Tensor) -> torch.Tensor:
    """The run's mean colour as a (1, 3, H, W) image in [0, 1]: a neutral attribution baseline."""
    mean, _ = _stats(run)
    return torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1).expand(1, -1, *like.shape[-2:]).clone()


def to_display(x_uint8) -> np.ndarray:
    """uint8 (n, 3, H, W) -> (n, H, W, 3) floats in [0, 1] for figures."""
    return np.asarray(x_uint8).transpose(0, 2, 3, 1).astype(np.float64) / 255.0


# =======================================================================================
# The home page's picture: what a conv keeps for backward
# =======================================================================================

def method_picture(model, conv_name: str, x: torch.Tensor, k: int, pool: str = "avg", channel: int = 0) -> dict:
    """For one image, the input of conv `conv_name` as the forward pass uses it, the K-pooled
    copy a compressed conv keeps for backward, and what backward rebuilds from it (nearest
    upsampling), with the bytes each takes per image (fp32; the mask is the 1-bit ReLU mask).

    Pooling and upsampling are core.compression's own functions, the ones training uses.
    Raises ValueError when K does not fit the layer's feature map.
    """
    from torch import nn

    from core.compression import _pool, _upsample, pack_mask
    from core.features import eval_mode

    module = dict(model.named_modules()).get(conv_name)
    if not isinstance(module, nn.Conv2d):
        raise ValueError(f"{conv_name!r} is not a conv layer of this model")
    seen: dict[str, torch.Tensor] = {}
    handle = module.register_forward_pre_hook(lambda _m, args: seen.__setitem__("x", args[0].detach()))
    try:
        with eval_mode(model), torch.no_grad():
            model(x[:1])
    finally:
        handle.remove()
    a = seen["x"][0].float()  # (C, H, W)
    c, h, w = a.shape
    if k > min(h, w):
        raise ValueError(f"K={k} is larger than the {h}x{w} feature map entering {conv_name}; pick a smaller K")
    channel = int(min(max(channel, 0), c - 1))
    pooled = _pool(a[None], pool, k)[0]  # (C, ceil(H/k), ceil(W/k))
    restored = _upsample(pooled[None], k, (h, w))[0]  # (C, H, W)
    after_relu = bool((a >= 0).all())
    rel = float((restored - a).norm() / a.norm().clamp_min(1e-12))
    return {"layer": conv_name, "shape": (c, h, w), "k": k, "pool": pool, "channel": channel,
            "activation": a[channel].numpy(), "pooled": pooled[channel].numpy(),
            "restored": restored[channel].numpy(), "rel_error": rel,
            "bytes": {"full": a.numel() * 4, "pooled": pooled.numel() * 4,
                      "mask": pack_mask(a[None] > 0).numel() if after_relu else None}}


# =======================================================================================
# Output: figures, tables, messages
# =======================================================================================

def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-").lower() or "figure"


def show(fig, name: str, caption: str | None = None, key: str | None = None) -> None:
    """A plotly figure with its PNG download button named after `name`, and a one-line caption."""
    config = {**PLOT_CONFIG, "toImageButtonOptions": {"format": "png", "filename": _slug(name), "scale": 2}}
    st.plotly_chart(fig, config=config, key=key, width="stretch")
    if caption:
        st.caption(caption)


def csv_bytes(rows: list[dict]) -> bytes:
    return rows_to_csv(rows).encode("utf-8") if rows else b""


def download_csv(rows: list[dict], filename: str, label: str = "Download table (CSV)"):
    st.download_button(label, csv_bytes(rows), file_name=filename, mime="text/csv", key=f"csv-{filename}",
                       disabled=not rows)


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


@contextlib.contextmanager
def guard(what: str = "", warn: bool = False):
    """Show any error of the block as a message in the page (the rest of the block is skipped;
    the page and the app go on)."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - a page must survive bad input; Streamlit's own control flow is BaseException
        msg = one_line(e)
        (st.warning if warn else st.error)(f"{what}: {msg}" if what else msg)


def need_runs(runs: list[Run], what: str = "this page") -> bool:
    """True when a run is selected; otherwise says so in the page."""
    if runs:
        return True
    st.info(f"Pick at least one run in the sidebar for {what}."
            + ("" if usable_runs() else " No runs yet: start one on the Train page."))
    return False


# =======================================================================================
# Uploads
# =======================================================================================

class UploadError(ValueError):
    """An uploaded file that cannot be used as an image; the message says why, in one line."""


MAX_SIDE = 8000
MAX_PIXELS = 40_000_000


def image_from_upload(data: bytes, size: int = 32) -> tuple[np.ndarray, list[str]]:
    """Bytes of an uploaded file -> (uint8 (size, size, 3) RGB image, notes on what was done).

    Grayscale, palette, CMYK, 16-bit and transparent images are converted (with a note);
    anything that is not a readable image, or is huge, raises UploadError.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise UploadError("the file is empty")
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise UploadError("this file is not an image PoolProp can read (use PNG, JPEG, BMP, GIF or WebP)") from None
    if w * h > MAX_PIXELS or max(w, h) > MAX_SIDE:
        raise UploadError(f"the image is too large ({w}×{h} pixels); use one at most {MAX_SIDE} pixels a side "
                          f"and {MAX_PIXELS // 1_000_000} million pixels in all")
    if w < 1 or h < 1:
        raise UploadError("the image has no pixels")
    try:
        img.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise UploadError("the image file is damaged or cut short") from None
    notes = []
    if getattr(img, "n_frames", 1) > 1:
        notes.append("an animation: its first frame is used")
    mode = img.mode
    if mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        a = np.asarray(img, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(a)
        img = Image.fromarray(a.round().astype(np.uint8), "L")
        notes.append(f"{mode} ({'16-bit' if mode.startswith('I;16') else 'high-bit-depth'}) image scaled to 8 bits")
        mode = "L"
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        notes.append("palette image converted to RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
        notes.append("transparent parts shown on white")
    elif mode in ("L", "1"):
        notes.append("grayscale: the same values in all three colour channels")
    elif mode != "RGB":
        notes.append(f"{mode} colours converted to RGB")
    img = img.convert("RGB")
    if w != h:
        img = ImageOps.fit(img, (min(w, h), min(w, h)))
        notes.append("cropped to the centre square")
    if img.size != (size, size):
        img = img.resize((size, size), Image.LANCZOS)
        notes.append(f"resized from {w}×{h} to {size}×{size} pixels (the size the models take)")
    return np.asarray(img, dtype=np.uint8).copy(), notes


# =======================================================================================
# Tables about runs
# =======================================================================================

def _mib(n) -> float | None:
    return round(n / 2 ** 20, 1) if isinstance(n, (int, float)) else None


def saved_bytes_of(run: Run) -> tuple[int | None, int | None]:
    """(saved-activation bytes, batch size they were measured at) from summary or config."""
    s, cfg = run.summary or {}, run.config or {}
    mem = cfg.get("memory") or {}
    n = s.get("saved_activation_bytes") or mem.get("saved_activation_bytes")
    batch = mem.get("measured_batch") or cfg.get("batch_size")
    return n, batch


def runs_table(runs: list[Run]) -> list[dict]:
    """One row per run (broken ones too) for the home page table and its CSV."""
    names = _all_labels(runs)
    rows = []
    for r in runs:
        cfg, s = r.config or {}, r.summary or {}
        saved, batch = saved_bytes_of(r)
        acc = s.get("last_val_acc")  # the last epoch's: what the saved weights score (no picking the best)
        rows.append({
            "run": names.get(str(r.path), r.name), "model": cfg.get("model"),
            "dataset": dataset_label(cfg["dataset"]) if cfg.get("dataset") else None,
            "policy": cfg.get("policy"),
            "epochs": f"{s.get('epochs_done', 0)}/{cfg.get('epochs', '?')}" if cfg else None,
            "accuracy %": round(100 * acc, 1) if isinstance(acc, (int, float)) else None,
            "saved activations MiB": _mib(saved), "at batch": batch,
            "status": r.status + (" (shipped)" if r.is_shipped else ""),
            "note": r.reason or "; ".join(r.notes) or "", "folder": str(r.path),
        })
    return rows


def pareto_rows(runs: list[Run]) -> list[dict]:
    """{"name", "policy", "acc", "memory"} per run with an accuracy (its last epoch's, what its
    weights score): memory is saved activations per training image (runs used different batch
    sizes), in bytes."""
    names = _all_labels(runs)
    rows = []
    for r in runs:
        saved, batch = saved_bytes_of(r)
        acc = (r.summary or {}).get("last_val_acc")
        if saved and batch and isinstance(acc, (int, float)):
            rows.append({"name": names[str(r.path)], "policy": (r.config or {}).get("policy", ""), "acc": acc,
                         "memory": saved / batch})
    return rows


def memory_rows(runs: list[Run]) -> list[dict]:
    """{"name", "saved_bytes", "state_bytes", "batch"} per run, for plots.run_memory_bars."""
    names = _all_labels(runs)
    rows = []
    for r in runs:
        saved, batch = saved_bytes_of(r)
        state = (r.summary or {}).get("model_state_bytes")
        if state is None:
            state = (((r.config or {}).get("memory") or {}).get("model_state_bytes") or {}).get("total")
        rows.append({"name": names[str(r.path)], "saved_bytes": saved, "state_bytes": state, "batch": batch})
    return rows
