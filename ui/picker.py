"""The runs every page compares: where they are found, their names and colours, and the sidebar's
run picker (filters by data set, schedule and policy family; each chip in its run's colour; seeds
grouped into settings or shown one by one).

Where runs come from (core.engine.runs.list_runs):
    default                      checkpoints/ (shipped) and runs/ (made here), each with one
                                 level of group folders (runs/shipped/<run>)
    POOLPROP_RUN_DIRS=A:B        only these folders (of runs, or runs themselves): tests, demos
    POOLPROP_RUNS_ROOT=DIR       where the Train page writes new runs and its queue (default runs/);
                                 always listed too
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import streamlit as st

from core.analysis import plots, run_groups, run_views
from core.engine.runs import LOCAL_DIR, Run, default_dirs, list_runs, run_folders
from core.method import CompressionPolicy

ENV_RUN_DIRS = "POOLPROP_RUN_DIRS"
ENV_RUNS_ROOT = "POOLPROP_RUNS_ROOT"
SELECTED = "selected_runs"  # session_state: list of run folder paths, shared by every page
PICKER_KEY = "_run_picker"
SEEDS_APART = "seeds_apart"  # session_state: True = every seed its own line
FILTERS = {"data": "_filter_data", "epochs": "_filter_epochs", "family": "_filter_family"}
ALL = "all"
MAX_SELECTED = 6


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


# =======================================================================================
# Names, colours, settings
# =======================================================================================

def _all_names(extra: list[Run] = ()) -> dict[str, str]:
    """Display names ('avg2+mask · CIFAR-10 · 20 ep · s1') made unique over every run on disk, so
    that a name never changes with the selection."""
    return run_groups.run_names([*all_runs(), *extra])


def label_of(run: Run) -> str:
    return _all_names([run])[str(run.path)]


def names_of(runs: list[Run]) -> list[str]:
    d = _all_names(runs)
    return [d[str(r.path)] for r in runs]


def _selected_names() -> list[str]:
    """Folder names of the sidebar's selection (its chips)."""
    chosen = set(st.session_state.get(SELECTED) or ())
    return [r.name for r in all_runs() if str(r.path) in chosen]


def colors_for(runs: list[Run]) -> dict[str, str]:
    """Display name -> colour; the colour comes from the run's folder name, resolved over all runs
    on disk, so a run keeps its colour on every page whatever else is selected (two selected runs
    never share one). A figure of some of the selected runs, or of runs beyond them (the home
    page's front), draws each selected run in its chip's colour and the others in colours no chip
    has (plots.shown_colors)."""
    by_folder = plots.shown_colors([r.name for r in all_runs()], _selected_names(), [r.name for r in runs])
    d = _all_names(runs)
    return {d[str(r.path)]: by_folder[r.name] for r in runs}


def seeds_apart() -> bool:
    return bool(st.session_state.get(SEEDS_APART, False))


def settings_of(runs: list[Run]) -> list[run_groups.Setting]:
    """The runs as settings (seeds grouped), or one by one when the sidebar's toggle says so."""
    return run_groups.group_settings(runs, _all_names(runs), apart=seeds_apart())


def setting_colors(settings: list[run_groups.Setting]) -> dict[str, str]:
    """Setting label -> colour: the colour of its first selected seed (the chip a reader sees), else
    of its first seed."""
    selected = set(st.session_state.get(SELECTED) or ())
    drawn = {s.label: next(((m, r) for m, r in zip(s.members, s.runs) if str(r.path) in selected),
                           (s.members[0], s.runs[0])) for s in settings}
    colors = colors_for([r for _, r in drawn.values()])  # one colour a setting: no palette spent on other seeds
    return {label: colors[member] for label, (member, _) in drawn.items()}


def policy_colors(policies: list[str]) -> dict[str, str]:
    """Policy -> colour for figures of policies rather than runs (the planner): a policy that a
    selected run trained with takes that run's chip colour (the first such run by name), the
    others colours no chip has, so that a colour never names two different things on one page."""
    chosen = set(st.session_state.get(SELECTED) or ())
    runs = sorted((r for r in usable_runs() if str(r.path) in chosen), key=lambda r: r.name)
    colors = colors_for(runs)
    chips: dict[str, str] = {}
    for r, name in zip(runs, names_of(runs)):
        with contextlib.suppress(ValueError, TypeError):
            chips.setdefault(str(CompressionPolicy.parse((r.config or {}).get("policy", ""))), colors[name])
    return plots.keyed_colors(policies, chips)


# =======================================================================================
# The picker
# =======================================================================================

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


def _filters(runs: list[Run]) -> list[Run]:
    """The filter row under the picker: which runs it offers (data set, schedule, family)."""
    options = run_groups.filter_options(runs)
    with st.sidebar.expander("Filter the list"):
        chosen = {}
        for what, label, fmt in (("data", "Data set", str), ("epochs", "Schedule", lambda e: f"{e} epochs"),
                                 ("family", "Policy family", str)):
            keep(FILTERS[what], ALL)
            values = [ALL, *options[what]]
            if st.session_state[FILTERS[what]] not in values:
                st.session_state[FILTERS[what]] = ALL
            chosen[what] = st.selectbox(label, values, key=FILTERS[what],
                                        format_func=lambda v, f=fmt: v if v == ALL else f(v))
    pick = {k: (None if v == ALL else v) for k, v in chosen.items()}
    return run_groups.filter_runs(runs, pick["data"], pick["epochs"], [pick["family"]] if pick["family"] else ())


def _chip_colors(selected: list[Run]) -> None:
    """Each chip of the picker in its run's colour (a tint with a border of it, dark text), and
    names not cut short: CSS on the multiselect's tags, which Streamlit numbers in order."""
    colors = colors_for(selected)
    names = names_of(selected)
    rules = [f'.st-key-{PICKER_KEY} [data-tag-index="{i}"] {{ background-color: {plots.rgba(colors[n], 0.18)}; '
             f"border: 2px solid {colors[n]}; color: #111; }}" for i, n in enumerate(names)]
    rules.append(f".st-key-{PICKER_KEY} [data-tag-index] {{ max-width: 100%; height: auto; }}")
    rules.append(f".st-key-{PICKER_KEY} [data-tag-index] > span {{ max-width: none; white-space: normal; "
                 "overflow: visible; text-overflow: clip; }")
    rules.append(f'.st-key-{PICKER_KEY} [data-tag-index] button {{ color: #111; }}')
    # every chip in view: the box's own height cap hid the fifth and sixth behind a scroll bar
    rules.append(f'.st-key-{PICKER_KEY} div[role="group"] {{ max-height: none; }}')
    st.html("<style>" + "\n".join(rules) + "</style>")


def run_picker() -> list[Run]:
    """Sidebar multiselect of runs; the choice lives in st.session_state[SELECTED] (all pages)."""
    runs = usable_runs()
    by_path = {str(r.path): r for r in runs}
    names = _all_names(runs)
    if SELECTED not in st.session_state:
        st.session_state[SELECTED] = run_views.default_selection(runs)
    chosen = list(st.session_state[SELECTED])
    gone = [p for p in chosen if p not in by_path]
    if gone:
        st.sidebar.warning("No longer available (deleted or damaged): " + ", ".join(Path(p).name for p in gone))
        chosen = [p for p in chosen if p in by_path]
        st.session_state[SELECTED] = chosen
    st.session_state[PICKER_KEY] = chosen  # set before the widget exists: allowed, and survives page switches
    offered = {str(r.path) for r in _filters(runs)} | set(chosen)
    st.sidebar.multiselect("Runs", [p for p in by_path if p in offered], key=PICKER_KEY,
                           format_func=lambda p: names.get(p, p), on_change=_sync_picker,
                           max_selections=MAX_SELECTED,
                           help="The runs every page compares. Each keeps its colour everywhere; "
                                "'Filter the list' narrows what is offered.")
    selected = [by_path[p] for p in st.session_state[SELECTED] if p in by_path]
    _chip_colors(selected)
    keep(SEEDS_APART, False)
    st.sidebar.toggle("Seeds one by one", key=SEEDS_APART,
                      help="Off: runs that differ only by seed are drawn as one setting, their mean with a "
                           "min–max band. On: every seed its own line.")
    if not runs:
        st.sidebar.info("No runs yet: train one on the Train page.")
    return selected
