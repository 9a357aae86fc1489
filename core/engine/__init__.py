"""The engine: training runs and everything around them, without Streamlit.

    data/       data sets by name, the on-device batch loader, small samples for pictures
    config.py   TrainConfig;  schedule.py  the LR schedule;  environment.py  process settings
    trainer.py  the Trainer (setup, run) with loop.py, records.py, resume.py, distributed.py
    runs/       the run directory: its writer beside its reader, listing, live progress
    launcher.py the app's per-device job queues;  jobs.py  the job runner every run goes through
    checks.py   will a config train;  evaluate.py  accuracy of a run's weights

Imports: core.method and core.models (and torch, numpy, safetensors; tqdm optional). Never
core.analysis, core.cli, the app or streamlit: this runs on a GPU machine with none of them.
"""
