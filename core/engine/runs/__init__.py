"""The run directory, the contract between trainer and app: its writer beside its reader.

    paths.py    where runs live (checkpoints/, runs/)
    writer.py   config.json, metrics.jsonl, model.safetensors, resume.*, summary.json, atomically
    reader.py   those files read back and validated; weights checked against the model
    listing.py  finding runs (shipped and local) and naming them for people
    live.py     where a running run is, from the end of its files
"""

from .listing import dataset_label, default_dirs, inspect_run, list_runs, run_folders, run_labels, run_mtime_key
from .live import live_progress, progress_fraction, tail_records
from .paths import LOCAL_DIR, ROOT, SHIPPED_DIR
from .reader import (
    PICKLE_SUFFIXES,
    RUN_FILES,
    MetricsLog,
    Run,
    RunError,
    check_weights,
    expected_state_shapes,
    load_config,
    load_model,
    load_state_dict,
    load_summary,
    pid_alive,
    read_metrics,
    resolve_run,
    run_path,
)
from .writer import RUN_FORMAT, RunWriter, dataset_short, default_run_dir

__all__ = ["LOCAL_DIR", "PICKLE_SUFFIXES", "ROOT", "RUN_FILES", "RUN_FORMAT", "SHIPPED_DIR", "MetricsLog", "Run",
           "RunError", "RunWriter", "check_weights", "dataset_label", "dataset_short", "default_dirs",
           "default_run_dir", "expected_state_shapes", "inspect_run", "list_runs", "live_progress",
           "load_config", "load_model", "load_state_dict", "load_summary", "pid_alive", "progress_fraction",
           "read_metrics", "resolve_run", "run_folders", "run_labels", "run_mtime_key", "run_path", "tail_records"]
