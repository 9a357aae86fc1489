"""What every page shares: the page frame, cached loaders, figure/CSV output, messages.

Pages stay thin: widgets -> a core call (through the cached loaders here) -> a figure from
core/analysis/plots/. Nothing here trains; the Train page goes through core/engine/launcher.py.
Which runs there are, their names and colours and the sidebar's run picker: ui/picker.py
(re-exported here, so pages say ui.names_of(...)).

Caching: models in st.cache_resource keyed by run folder + the mtime of
model.safetensors (shared between sessions: treat them as read-only, deep-copy before
anything that swaps layers); images, metrics and run lists in st.cache_data.
"""

from __future__ import annotations

import contextlib
import copy
import re
from pathlib import Path
from typing import NamedTuple

import numpy as np
import streamlit as st
import torch

from core.analysis import images, run_views
from core.analysis.report import rows_to_csv
from core.engine.data import samples
from core.engine.launcher import Launcher, device_key
from core.engine.runs import Run, RunError, live_progress, load_model, progress_fraction, read_metrics, run_mtime_key
from ui.picker import (  # noqa: F401 - the pages' names for them
    SELECTED,
    _all_names,
    all_runs,
    colors_for,
    keep,
    label_of,
    names_of,
    policy_colors,
    run_picker,
    runs_root,
    setting_colors,
    settings_of,
    usable_runs,
)

PLOT_CONFIG = {"displaylogo": False, "modeBarButtonsToRemove": ["lasso2d", "select2d"]}
# Streamlit's wide layout pads the page by 5rem a side: at a projector's 1024 px, with the sidebar
# open, that left figures 500 px. Less padding gives them a quarter more room.
NARROW_CSS = ("<style>@media (max-width: 1400px) { [data-testid=stMainBlockContainer] "
              "{ padding-left: 1.5rem; padding-right: 1.5rem; } }</style>")


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
    st.html(NARROW_CSS)
    st.title(title)
    if intro:
        st.caption(intro)
    selected = run_picker()
    with st.sidebar:
        status_panel()
    return selected


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
def _run_images(dataset: str, split_seed: int, classes: tuple, n: int, seed: int):
    return samples.run_images({"dataset": dataset, "split_seed": split_seed, "classes": list(classes)}, n, seed)


class Images(NamedTuple):
    """What pick_images gives: uint8 (n, 3, H, W) images, labels, the images' classes; `problem`
    (a warning: not the run's data) and `source` (a note: where the images are from, when not
    the run's own validation split)."""

    x: np.ndarray
    y: np.ndarray
    classes: list[str]
    problem: str | None = None
    source: str | None = None


def pick_images(run: Run | None, n: int, seed: int = 0) -> Images:
    """Validation images of `run`'s data (for a CIFAR-10 run whose data is not here, the shipped
    sample of its validation split), or the built-in set when run is None or its data is not
    on this machine (`problem` then says so)."""
    if run is not None:
        cfg = run.config or {}
        try:
            x, y, classes, source = _run_images(str(cfg.get("dataset", samples.FEATURES10)),
                                                int(cfg.get("split_seed", 0) or 0), tuple(cfg.get("classes") or ()),
                                                n, seed)
            return Images(x, y, classes, None, source)
        except Exception as e:  # noqa: BLE001 - missing data must not break a page
            return Images(*builtin_images(n, seed), f"The run's dataset is not available here ({one_line(e)}); "
                                                    "showing the built-in set instead.")
    return Images(*builtin_images(n, seed))


def source_note(images: Images) -> None:
    """The warning or the note that goes with images from pick_images, if any."""
    if images.problem:
        st.warning(images.problem)
    elif images.source:
        st.caption(f"Images: {images.source}.")


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
    return run_views.runs_table(runs, _all_names(runs))


def pareto_rows(runs: list[Run]) -> list[dict]:
    return run_views.pareto_rows(runs, _all_names(runs))


def memory_rows(runs: list[Run]) -> list[dict]:
    return run_views.memory_rows(runs, _all_names(runs))
