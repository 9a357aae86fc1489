"""Train: start a run (a separate process, via core.engine.launcher), watch it live, stop it."""

import time
from pathlib import Path

import streamlit as st

from core.analysis import plots
from core.engine.checks import check_config
from core.engine.config import TrainConfig
from core.engine.launcher import device_key
from core.engine.runs import live_progress, load_summary, progress_fraction
from core.method import CompressionPolicy
from core.method.meter import format_bytes
from core.models import MODEL_MENU
from ui import common as ui

ui.page("Train", "Start a training run and watch it live. It runs in its own process, so closing the tab "
                 "does not stop it. One run per device at a time; further starts wait in a queue.")

PRESETS = ["none", "avg2+mask", "avg4+mask", "avg2+mask+bn8", "q4+mask+bn4", "q2+mask+bn2", "avg2+res2+mask+bn4",
           "avg2-lowres+mask", "max2+mask", "avg2", "mask", "ckpt"]
DATASETS = {"features10 (built in)": "features10", "CIFAR-10 (torchvision)": "cifar10",
            "image folder…": "imagefolder"}
JOB_KEY = "train_job_id"
MSG_KEY = "train_message"  # (job id, "success" | "info", text): shown while that job waits or runs
LAST_KEY = "train_last_start"  # (config without its folder, time.time()) of this tab's last start
PENDING_KEY = "train_pending"  # a config held back as a possible duplicate, waiting for a yes
DUPLICATE_S = 10.0  # a second identical start within this many seconds asks first


def policy_text(preset: str, custom: str) -> str:
    return custom.strip() or preset


def same_run(config: dict) -> dict:
    """What makes two starts the same run: the config without the folder it would write to."""
    return {k: v for k, v in config.items() if k != "out"}


def recent_duplicate(config: dict) -> str | None:
    """Why starting `config` now looks like a second click (None when it does not): the same
    run started from this tab, or queued or running from any tab, in the last DUPLICATE_S s."""
    now = time.time()
    last = st.session_state.get(LAST_KEY)
    if last and last[0] == same_run(config) and now - last[1] < DUPLICATE_S:
        return f"You started this same run {now - last[1]:.0f} s ago."
    try:
        jobs = ui.launcher().jobs(device_key(config.get("device", "auto")))
    except OSError:  # an unreadable queue: the page says so below; this check just has less to go on
        jobs = []
    for job in jobs:
        if job.state in ("queued", "running") and now - (job.created or 0) < DUPLICATE_S \
                and same_run(job.config or {}) == same_run(config):
            return f"The same run was {job.state} {now - job.created:.0f} s ago ({job.label})."
    return None


def start(cfg: TrainConfig, label: str) -> None:
    """Queue the run (it starts at once when the device is free) and say so."""
    with ui.guard("Could not start"):
        launcher = ui.launcher()
        running = launcher.active(device_key(cfg.device))
        job = launcher.submit(cfg, label=label)
        st.session_state[JOB_KEY] = job.id
        st.session_state[LAST_KEY] = (same_run(cfg.to_dict()), time.time())
        if job.state == "running":
            st.session_state[MSG_KEY] = (job.id, "success", f"Started: {job.label}")
        else:
            who = running.label if running is not None else "another run"
            st.session_state[MSG_KEY] = (job.id, "info", f"Queued (number {job.position} in line): {who} is "
                                                         f"training on {job.device}. Yours starts when it ends.")


# Enter in a field does not submit (enter_to_submit=False): only the Start button starts a run
with st.form("train_form", enter_to_submit=False):
    c1, c2, c3 = st.columns(3)
    model = c1.selectbox("Model", MODEL_MENU, index=MODEL_MENU.index("resnet20"),
                         help="torchvision's models train at the data's own size (32 px for CIFAR): use qB policies, "
                              "or stages=1,2, where their last stages are too small to pool")
    dataset_label = c2.selectbox("Dataset", list(DATASETS))
    folder = c3.text_input("Image folder", placeholder="path/to/folder",
                           help="For the dataset 'image folder…': a folder with one subfolder of images per class")
    c4, c5 = st.columns(2)
    preset = c4.selectbox("Policy", PRESETS, index=1, help="What each layer keeps for the backward pass")
    custom = c5.text_input("…or a custom policy", placeholder="e.g. avg4-lowres+mask+bn8",
                           help="Parts joined by '+': avgK/maxK (K = 1, 2, 4, 8, optional -lowres), qB (conv input "
                                "in B bits), resB (with avgK: a B-bit residual), mask, bn16, bn8, bn4, bn2, ckpt, "
                                "nostem, stages=1,2")
    # whole numbers four a row; the learning rate (a decimal) in a row of three, where it fits at 1024 px
    c6, c7, c8, c9 = st.columns(4)
    epochs = c6.number_input("Epochs", 1, 1000, 3)
    batch = c7.number_input("Batch size", 1, 8192, 128)
    seed = c8.number_input("Seed", 0, 2 ** 31 - 1, 0)
    budget = c9.number_input("Time budget, s", 0, 10 ** 7, 0,
                             help="0 = none. Train for this many seconds; the learning-rate schedule is fitted to the "
                                  "time, so a one-minute classroom run still ends well-annealed (--time-budget)")
    c10, c11, c12 = st.columns(3)
    lr = c10.number_input("Learning rate (0 = auto)", 0.0, 10.0, 0.0, step=0.01, format="%.4f",
                          help="0: 0.1 × batch/128, scaled with the batch (SGD, one-cycle schedule)")
    steps = c11.number_input("Stop after steps (0 = no cap)", 0, 10 ** 7, 0)
    subset = c12.number_input("Training images (0 = all)", 0, 10 ** 8, 0,
                              help="A fixed subset makes a quick classroom run on a CPU")
    in_backward = st.checkbox("Optimiser step inside the backward (less memory, the same weights)",
                              help="Each parameter is updated as soon as its gradient is complete and that gradient "
                                   "freed, so the gradients never all coexist (--step-in-backward)")
    submitted = st.form_submit_button("Start training", type="primary")

if submitted:
    text = policy_text(preset, custom)
    dataset = DATASETS[dataset_label]
    problems = []
    if dataset == "imagefolder":
        dataset = f"imagefolder:{folder.strip()}" if folder.strip() else ""
        if not dataset:
            problems.append("Give the image folder's path for 'image folder…'.")
    try:
        policy = CompressionPolicy.parse(text)  # parsed once: the config carries the policy itself
    except ValueError as e:
        problems.append(f"Policy {text!r}: {ui.one_line(e)}")
        policy = None
    if not problems:
        cfg = TrainConfig(model=model, dataset=dataset, policy=policy, epochs=int(epochs), batch_size=int(batch),
                          lr=float(lr) or None, seed=int(seed), steps=int(steps) or None,
                          train_subset=int(subset) or None, time_budget=float(budget) or None, log_every=10,
                          step_in_backward=in_backward)
        problems = check_config(cfg)
    if problems:
        for p in problems:
            st.error(p)
    else:
        label = f"{model} {policy} · {dataset.split(':')[0]} · s{int(seed)}"
        st.session_state.pop(PENDING_KEY, None)
        if why := recent_duplicate(cfg.to_dict()):
            st.session_state[PENDING_KEY] = (cfg.to_dict(), label, why)
        else:
            start(cfg, label)

if PENDING_KEY in st.session_state:  # a second identical start: ask before queuing a duplicate
    config, label, why = st.session_state[PENDING_KEY]
    st.warning(f"{why} Start another identical run?")
    yes, no, _ = st.columns([2, 1, 3])
    if yes.button("Yes, start another", key="train_confirm"):
        st.session_state.pop(PENDING_KEY)
        start(TrainConfig.from_dict(config), label)
        st.rerun()
    if no.button("No", key="train_cancel"):
        st.session_state.pop(PENDING_KEY)
        st.rerun()


def job_status(job, progress: dict) -> str:
    """The header's word for a job: a failed run says "failed" even when it died before writing
    its summary (the job then is just "done"), never "done"."""
    if job.error or progress["status"] == "failed":
        return "failed"
    if progress["status"]:
        return progress["status"]
    return {"running": "starting…", "done": "ended"}.get(job.state, job.state)


@st.fragment(run_every=2)
def live_view() -> None:
    launcher = ui.launcher()
    device = device_key("auto")
    try:
        jobs = launcher.jobs(device)
    except OSError as e:
        st.error(f"Cannot read the training queue: {e}")
        return
    running = [j for j in jobs if j.state == "running"]
    queued = [j for j in jobs if j.state == "queued"]
    mine = next((j for j in jobs if j.id == st.session_state.get(JOB_KEY)), None)
    job = running[0] if running else (mine or next((j for j in reversed(jobs) if j.state == "done"), None))
    st.header("Live")
    if job is None:
        st.info("Nothing is training. Fill in the form and press **Start training**.")
        return
    p = live_progress(job.run_dir)
    message = st.session_state.get(MSG_KEY)
    announced = next((j for j in jobs if message and j.id == message[0]), None)
    if announced is not None and announced.state in ("queued", "running") and not announced.error:
        (st.success if message[1] == "success" else st.info)(message[2])
    elif message:  # the run it announced has ended (or failed): the header says so, not a green "Started"
        st.session_state.pop(MSG_KEY, None)
    status = job_status(job, p)
    top, stop_col = st.columns([5, 1])
    top.subheader(f"{job.label} — {status}")
    top.progress(progress_fraction(p), text=f"step {p['step']} of {p['total_steps'] or '?'} · "
                                               f"epoch {p['epoch']} of {p['epochs'] or '?'}")
    if job.state == "running":
        if stop_col.button("Stop", type="primary", key="stop_training"):
            launcher.stop(job.id)
            st.info("Stopping: the run ends after this step and keeps its weights.")
    if job.error:
        st.error(f"The run failed: {job.error}")
    earlier = next((j for j in reversed(jobs) if j.state == "done" and j.id != job.id), None)
    if earlier is not None:
        how = live_progress(earlier.run_dir)["status"] or "ended"
        st.caption(f"Before: {earlier.label} — {how}" + (" (weights kept)" if how in ("stopped", "finished") else "")
                   + (f": {earlier.error}" if earlier.error and how not in ("stopped", "finished") else ""))
    records = ui.metrics_of(job.run_dir)
    if not any(r.get("type") == "step" for r in records):
        if job.state == "running":
            st.info("Starting: loading the data and measuring memory. The first numbers appear in a few seconds.")
        return
    name = job.label
    colors = {name: plots.run_color(Path(job.run_dir).name)}
    left, right = st.columns(2)
    with left:
        ui.show(plots.loss_curves({name: records}, "train_loss", "step", smoothing=0.6, colors=colors,
                                  title="Training loss"), "live-loss", key="live_loss")
    with right:
        has_eval = sum(r.get("type") == "eval" for r in records) >= 2  # one point alone says little
        y = "val_acc" if has_eval else "train_acc"
        ui.show(plots.loss_curves({name: records}, y, "step", colors=colors,
                                  title="Validation accuracy" if has_eval else "Training accuracy"),
                "live-accuracy", key="live_acc")
    st.caption("Loss (smoothed) and accuracy of the run, redrawn every 2 seconds from its metrics file.")
    saved = next((r["saved_bytes"] for r in records if r.get("saved_bytes")), None)
    peak = next((r["cuda_peak"] for r in reversed(records) if r.get("cuda_peak")), None)
    m1, m2, m3, m4 = st.columns(4)
    # labels short enough for a quarter of a projector's 1024 px (longer ones were cut to "Validation accu…")
    m1.metric("Saved per step", format_bytes(saved) if saved else "—",
              help="Activation bytes one training step keeps for its backward pass")
    m2.metric("CUDA peak", format_bytes(peak) if peak else "CPU run")
    evals = [r for r in records if r.get("type") == "eval" and r.get("val_acc") is not None]
    m3.metric("Val. accuracy", f"{100 * evals[-1]['val_acc']:.1f} %" if evals else "—",
              help=f"After epoch {evals[-1].get('epoch')}" if evals else "Measured at the end of each epoch")
    # while it runs, the last steps' rate; once it has ended, the whole run's (what its summary keeps)
    ended = p["status"] in ("finished", "stopped")
    rate = (load_summary(job.run_dir) or {}).get("samples_per_s") if ended else None
    if rate is None:
        last = next((r for r in reversed(records) if r.get("type") == "step"), None)
        rate, ended = (last or {}).get("samples_per_s"), False
    m4.metric("Images / s", f"{rate:.0f}" if rate else "—",
              help="Over the whole run" if ended else "Over the last logged steps")
    if peak:
        ui.show(plots.cuda_memory_curves({name: records}, colors=colors, title="GPU memory while training"),
                "live-memory", "The most memory the GPU had allocated so far, step by step.", key="live_mem")
    if queued:
        st.subheader("Waiting")
        for q in queued:
            a, b = st.columns([5, 1])
            a.write(f"{q.position}. {q.label}")
            if b.button("Cancel", key=f"cancel-{q.id}"):
                launcher.stop(q.id)
                st.rerun(scope="fragment")


live_view()
