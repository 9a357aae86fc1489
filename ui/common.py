"""What every page shares: the run picker, cached loaders, figure/CSV output, messages.

Pages stay thin: widgets -> a core call (through the cached loaders here) -> a figure from
core/analysis/plots/. Nothing here trains; the Train page goes through core/engine/launcher.py.

Where runs come from (core.engine.runs.list_runs):
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
import os
import re
from pathlib import Path

import numpy as np
import streamlit as st
import torch

from core.analysis import images, plots, run_views
from core.analysis.report import rows_to_csv
from core.engine.data import samples
from core.engine.launcher import Launcher, device_key
from core.engine.runs import (
    LOCAL_DIR,
    Run,
    RunError,
    list_runs,
    live_progress,
    load_model,
    progress_fraction,
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
    from core.engine.runs import default_dirs

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
        st.session_state[SELECTED] = run_views.default_selection(runs)
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


@st.cache_data(max_entries=32, show_spinner=False)
def builtin_images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """n fresh images of the built-in features10 set (offline, fast): uint8 (n, 3, 32, 32), labels, classes."""
    return samples.builtin_images(n, seed)


@st.cache_data(max_entries=32, show_spinner=False)
def heldout_images(dataset: str, n: int, split_seed: int = 0, seed: int = 0
                   ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """n validation images of a run's dataset (cached); see core.engine.data.samples."""
    return samples.heldout_images(dataset, n, split_seed, seed)


def run_images(run: Run, n: int, seed: int = 0):
    cfg = run.config or {}
    return heldout_images(str(cfg.get("dataset", samples.FEATURES10)), n, int(cfg.get("split_seed", 0)), seed)


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
    return images.to_input(x_uint8, run.config if run is not None else None)


def pixel_model(run: Run) -> images.PixelInput:
    """The run's model taking [0, 1] pixels; a private copy, since attribution and CKA install
    hooks (removed afterwards, but another session could run the shared one meanwhile)."""
    return images.PixelInput(model_of(run, private=True), *images.run_stats(run.config))


def mean_image(run: Run | None, like: torch.Tensor) -> torch.Tensor:
    return images.mean_image(run.config if run is not None else None, like)


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
# Tables about runs (core.analysis.run_views, with the app's run names)
# =======================================================================================

def runs_table(runs: list[Run]) -> list[dict]:
    return run_views.runs_table(runs, _all_labels(runs))


def pareto_rows(runs: list[Run]) -> list[dict]:
    return run_views.pareto_rows(runs, _all_labels(runs))


def memory_rows(runs: list[Run]) -> list[dict]:
    return run_views.memory_rows(runs, _all_labels(runs))
