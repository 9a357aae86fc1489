"""The Streamlit app: every page runs with runs selected (AppTest), key widgets are there,
bad input gives a message, and the Train page goes through the launcher.

Two tiny runs are trained once per session (conftest's tiny_runs), and the app is pointed at
them with POOLPROP_RUN_DIRS (new runs and the launcher's queue: POOLPROP_RUNS_ROOT, per test).
AppTest draws no charts but keeps each figure's plotly spec, which some tests read; how figures
look is covered by tests/test_plots.py and the browser test. Here we check text, widgets, state
and the numbers a page shows.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from streamlit.testing.v1 import AppTest

from core.engine.launcher import Job, Launcher

ROOT = Path(__file__).resolve().parents[1]
PAGES = {
    "home": "app.py",
    "train": "pages/1_Train.py",
    "loss": "pages/2_Loss_curves.py",
    "memory": "pages/3_Memory.py",
    "fidelity": "pages/4_Gradient_fidelity.py",
    "filters": "pages/5_Filters_and_features.py",
    "attributions": "pages/6_Attributions.py",
}
TITLES = {"home": "PoolProp", "train": "Train", "loss": "Loss curves", "memory": "Memory",
          "fidelity": "Gradient fidelity", "filters": "Filters & features", "attributions": "Attributions"}


@pytest.fixture(scope="session")
def runs_dir(tiny_runs) -> Path:
    """Two finished tiny runs (baseline and avg2+mask), 2 epochs of 2 steps each (conftest.py)."""
    return tiny_runs


@pytest.fixture
def app_env(runs_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("POOLPROP_RUN_DIRS", str(runs_dir))
    monkeypatch.setenv("POOLPROP_RUNS_ROOT", str(tmp_path / "new_runs"))  # the launcher's queue goes here
    return runs_dir


def page(name: str) -> AppTest:
    at = AppTest.from_file(str(ROOT / PAGES[name]), default_timeout=300)
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    return at


def texts(elements) -> str:
    return " | ".join(str(e.value) for e in elements)


def no_errors(at: AppTest) -> None:
    assert not at.exception, [e.message for e in at.exception]
    assert not at.error, texts(at.error)


def test_navigation_lists_every_page_file_once():
    """A page file missing from ui/navigation.py would be unreachable (st.navigation ignores pages/)."""
    from ui.navigation import HOME, VIEWS

    listed = [HOME] + [path for path, _ in VIEWS]
    on_disk = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "pages").glob("*.py"))
    assert sorted(listed) == on_disk
    assert len(set(listed)) == len(listed)


@pytest.mark.parametrize("name", list(PAGES))
def test_page_runs_with_runs_selected(app_env, name):
    at = page(name)
    no_errors(at)
    assert at.title[0].value == TITLES[name]
    assert len(at.session_state["selected_runs"]) == 2  # the default: both tiny runs
    assert len(at.sidebar.multiselect) == 1  # the run picker, on every page


def test_home_elements(app_env):
    at = page("home")
    assert at.selectbox(key="home_model").options[-1] == "untrained ResNet-20"
    assert "baseline" not in texts(at.error)
    table = at.dataframe[0].value
    assert len(table) == 2 and {"model", "policy", "accuracy %", "saved activations MiB", "status"} <= set(table)
    # what a projector's width shows before the table scrolls: the name and the answers
    assert list(table)[:4] == ["run", "accuracy %", "saved activations MiB", "at batch"]
    at.select_slider(key="home_k").set_value(4).run()
    at.selectbox(key="home_layer").set_value("layer3.0.conv1").run()
    at.radio(key="home_source").set_value("built-in set").run()
    no_errors(at)
    at.selectbox(key="home_model").set_value("untrained ResNet-20").run()
    no_errors(at)
    # ResNet-20 on 32x32 images: stage 2 opens with a stride-2 conv on stage 1's 16x32x32 output
    for layer, shape in [("layer2.0.conv1", "16 channels × 32×32"), ("layer2.0.conv2", "32 channels × 16×16"),
                         ("layer3.2.conv2", "64 channels × 8×8")]:
        at.selectbox(key="home_layer").set_value(layer).run()
        no_errors(at)
        assert f"**{shape}**" in texts(at.markdown), layer


def test_selection_persists_and_a_deleted_run_gives_a_message(app_env, tmp_path, monkeypatch):
    extra = tmp_path / "more"
    shutil.copytree(app_env / "tiny-none", extra / "copy-none")
    monkeypatch.setenv("POOLPROP_RUN_DIRS", f"{app_env}:{extra}")
    at = AppTest.from_file(str(ROOT / PAGES["filters"]), default_timeout=300)
    at.session_state["selected_runs"] = [str(extra / "copy-none"), str(app_env / "tiny-avg2_mask")]
    at.run()
    no_errors(at)
    shutil.rmtree(extra / "copy-none")
    at.run()
    assert not at.exception
    assert "No longer available" in texts(at.sidebar.warning)
    assert at.session_state["selected_runs"] == [str(app_env / "tiny-avg2_mask")]


def test_the_run_list_notices_a_run_written_into_a_group_folder(app_env, tmp_path, monkeypatch):
    """A retraining writes runs/shipped/<run>: the cached run list must pick it up on the next
    rerun, not a minute later."""
    from ui import common as ui

    runs = tmp_path / "runs"
    shutil.copytree(app_env / "tiny-none", runs / "direct")
    (runs / "shipped").mkdir()
    monkeypatch.setenv("POOLPROP_RUN_DIRS", str(runs))
    assert [r.name for r in ui.all_runs()] == ["direct"]
    shutil.copytree(app_env / "tiny-avg2_mask", runs / "shipped" / "retrained")
    assert sorted(r.name for r in ui.all_runs()) == ["direct", "retrained"]


def test_sidebar_shows_a_run_training_outside_the_app(app_env, tmp_path, monkeypatch):
    """A run started by `core train` or train_shipped.py (not in the app's queue) still shows as
    training, with how far it is; once it has finished, nothing is."""
    live = tmp_path / "runs" / "live"
    shutil.copytree(app_env / "tiny-none", live)
    summary = json.loads((live / "summary.json").read_text())
    (live / "summary.json").write_text(json.dumps({**summary, "status": "running", "pid": os.getpid()}))
    monkeypatch.setenv("POOLPROP_RUN_DIRS", str(live.parent))
    at = page("loss")
    sidebar = texts(at.sidebar.markdown)
    assert "(started outside the app)" in sidebar and "none · 2 ep · s0" in sidebar
    (live / "summary.json").write_text(json.dumps(summary))  # finished
    at = page("loss")
    assert "**Training** · none running" in texts(at.sidebar.markdown)


def test_model_of_a_vanished_run_raises_a_clear_error(app_env, tmp_path):
    from core.engine.runs.listing import inspect_run
    from core.engine.runs.reader import RunError
    from ui import common as ui

    shutil.copytree(app_env / "tiny-none", tmp_path / "gone")
    run = inspect_run(tmp_path / "gone")
    shutil.rmtree(tmp_path / "gone")
    with pytest.raises(RunError, match="gone"):
        ui.model_of(run)


# ---------------------------------------------------------------------------------------
# Train page
# ---------------------------------------------------------------------------------------

@pytest.fixture
def fake_launcher(monkeypatch):
    calls = {"submit": [], "running": None, "jobs": []}

    def submit(self, config, label=None):
        calls["submit"].append(config)
        state = "queued" if calls["running"] else "running"
        job = Job(id=f"job{len(calls['submit'])}", device="cpu", run_dir=str(self.root / "new"),
                  config=config.to_dict(), label=label or "x", state=state, created=time.time(),
                  position=1 if state == "queued" else 0)
        calls["jobs"].append(job)
        return job

    monkeypatch.setattr(Launcher, "submit", submit)
    monkeypatch.setattr(Launcher, "active", lambda self, device=None: calls["running"])
    monkeypatch.setattr(Launcher, "jobs",
                        lambda self, device=None: [j for j in [calls["running"], *calls["jobs"]] if j])
    return calls


def _start(at: AppTest) -> AppTest:
    return at.button(key="FormSubmitter:train_form-Start training").click().run()


def test_train_start_calls_the_launcher(app_env, fake_launcher):
    at = page("train")
    assert any(b.label == "Start training" for b in at.button)
    at.number_input[0].set_value(2)  # epochs
    _start(at)
    no_errors(at)
    assert len(fake_launcher["submit"]) == 1
    cfg = fake_launcher["submit"][0]
    assert (cfg.model, str(cfg.policy), cfg.epochs) == ("resnet20", "avg2+mask", 2)
    assert "Started" in texts(at.success)


def test_a_policy_is_parsed_once_from_the_train_page_to_the_trainer(app_env, fake_launcher, monkeypatch, tmp_path):
    """Text becomes a CompressionPolicy once where it comes in (the page), travels as the
    config's JSON, and is parsed once more in the job runner's process, by the trainer: not
    at every hand-over (validate, check, submit, to_dict, argv, ...)."""
    from core.engine.jobs import run_training
    from core.method import CompressionPolicy

    parsed = []
    real = CompressionPolicy._from_text.__func__
    monkeypatch.setattr(CompressionPolicy, "_from_text",
                        classmethod(lambda cls, text: parsed.append(text) or real(cls, text)))
    at = page("train")
    at.text_input[1].set_value("avg4+mask")  # the custom policy field
    _start(at)
    no_errors(at)
    assert parsed.count("avg4+mask") == 1  # the page (other parses are of the listed runs' configs)
    queued = json.loads(json.dumps(fake_launcher["submit"][0].to_dict()))  # what the queue file holds
    parsed.clear()
    queued.update(dataset="features10:train=64,val=32", epochs=1, batch_size=32, out=str(tmp_path / "run"),
                  progress=False, fidelity_every=0)
    assert run_training(queued) == 0
    assert parsed == ["avg4+mask"]  # the job runner's process: once, as the trainer resolves the config


def test_train_queues_when_a_run_is_active(app_env, fake_launcher):
    fake_launcher["running"] = Job(id="busy", device="cpu", run_dir=str(app_env / "tiny-none"), config={},
                                   label="someone else's run", state="running")
    at = page("train")
    assert any(b.label == "Stop" for b in at.button)  # the live view of the active run
    _start(at)
    no_errors(at)
    assert "Queued" in texts(at.info) and "someone else's run" in texts(at.info)


def test_the_live_view_of_an_ended_run_gives_its_accuracy_and_whole_run_rate(app_env, fake_launcher):
    """A finished run's panel names its last validation accuracy and the images per second of its
    whole run (its summary's), not only the last logged step's rate (222 beside a summary's 138)."""
    from core.engine.runs import load_summary, read_metrics

    run = app_env / "tiny-none"
    fake_launcher["jobs"].append(Job(id="old", device="cpu", run_dir=str(run), config={}, label="tiny none",
                                     state="done"))
    at = page("train")
    no_errors(at)
    metrics = {m.label: m for m in at.metric}
    last_eval = [r for r in read_metrics(run) if r.get("type") == "eval"][-1]
    assert metrics["Val. accuracy"].value == f"{100 * last_eval['val_acc']:.1f} %"
    assert metrics["Images / s"].value == f"{load_summary(run)['samples_per_s']:.0f}"
    assert "whole run" in metrics["Images / s"].help


def test_train_rejects_bad_settings(app_env, fake_launcher):
    at = page("train")
    at.text_input[1].set_value("avg3+mask")  # custom policy: K=3 is not a choice
    _start(at)
    assert "avg3" in texts(at.error)
    at.text_input[1].set_value("avg8+mask")
    at.selectbox[0].set_value("resnet18")
    _start(at)
    assert "K=8 is larger" in texts(at.error)
    assert fake_launcher["submit"] == []


def test_enter_in_a_train_field_does_not_start_a_run(app_env, fake_launcher):
    """Enter in Epochs, Batch size or any other field of the form must not submit it (the browser
    test presses Enter for real); only the Start button starts a run."""
    at = page("train")
    (form,) = at.get("form")
    assert form.proto.form.enter_to_submit is False
    at.number_input[0].set_value(5).run()  # a field changed, no button pressed
    assert fake_launcher["submit"] == []


def test_a_second_identical_start_asks_before_queuing_a_duplicate(app_env, fake_launcher):
    at = page("train")
    _start(at)
    assert len(fake_launcher["submit"]) == 1
    _start(at)  # the same run again, a moment later (a double click, or Start pressed twice)
    no_errors(at)
    assert len(fake_launcher["submit"]) == 1
    assert "Start another identical run?" in texts(at.warning)
    at.button(key="train_cancel").click().run()
    assert len(fake_launcher["submit"]) == 1 and not at.warning
    _start(at)
    at.button(key="train_confirm").click().run()  # yes: a second run of the same settings
    no_errors(at)
    assert len(fake_launcher["submit"]) == 2
    at.number_input[0].set_value(4)  # other settings are another run: no question
    _start(at)
    assert len(fake_launcher["submit"]) == 3 and not at.warning


def test_the_train_form_has_the_time_budget_of_the_classroom_recipe(app_env, fake_launcher):
    at = page("train")
    (budget,) = [n for n in at.number_input if n.label.startswith("Time budget")]
    budget.set_value(55)
    _start(at)
    assert fake_launcher["submit"][0].time_budget == 55.0


def test_the_train_form_can_step_the_optimiser_inside_the_backward(app_env, fake_launcher):
    at = page("train")
    _start(at)
    (box,) = [c for c in at.checkbox if c.label.startswith("Optimiser step inside the backward")]
    box.check()
    _start(at)
    assert [c.step_in_backward for c in fake_launcher["submit"]] == [False, True]


def test_a_failed_run_says_failed_and_the_started_banner_goes(app_env, fake_launcher):
    at = page("train")
    _start(at)
    assert "Started" in texts(at.success)
    job = fake_launcher["jobs"][0]
    assert any(h.value.endswith("— starting…") for h in at.subheader)
    job.state, job.error = "done", "error: out of memory"  # the job runner found it dead, with its error
    at.run()
    assert not at.exception
    assert any(h.value.endswith("— failed") for h in at.subheader), texts(at.subheader)
    assert not any(h.value.endswith("— done") for h in at.subheader)
    assert not at.success and "out of memory" in texts(at.error)


# ---------------------------------------------------------------------------------------
# Pages with buttons (small settings, real computations)
# ---------------------------------------------------------------------------------------

def test_loss_curves_table(app_env):
    at = page("loss")
    table = at.dataframe[0].value
    assert len(table) == 2 and "run" in table
    assert list(table["trained on"]) == ["CPU, float32"] * 2  # seconds compare on one device only
    at.radio(key="lc_x").set_value("epoch").run()
    at.checkbox(key="lc_log").check().run()
    no_errors(at)


def test_loss_curves_per_class_change_against_the_baseline(app_env):
    at = page("loss")
    (show,) = [s for s in at.selectbox if s.label.startswith("Per-class bars, ")]
    assert show.value.startswith("change vs none")  # the baseline run is picked by default
    summaries = {p.name: json.loads((p / "summary.json").read_text()) for p in app_env.iterdir()}
    expected = [100 * (a - b) for a, b in zip(summaries["tiny-avg2_mask"]["per_class_val_acc"],
                                              summaries["tiny-none"]["per_class_val_acc"])]
    fig = json.loads(at.get("plotly_chart")[-1].proto.spec)
    (trace,) = fig["data"]  # one bar per class for the compressed run; the baseline is the zero line
    assert trace["y"] == pytest.approx(expected)
    show.select_index(0).run()  # "accuracy"
    no_errors(at)
    fig = json.loads(at.get("plotly_chart")[-1].proto.spec)
    assert [t["y"] for t in fig["data"]] == [
        pytest.approx([100 * a for a in summaries[n]["per_class_val_acc"]]) for n in ("tiny-none", "tiny-avg2_mask")]


def test_memory_ladder_and_planner(app_env):
    at = page("memory")
    at.number_input(key="mem_batch").set_value(2)
    at.checkbox(key="mem_timed").uncheck()
    at.multiselect(key="mem_policies").set_value(["none", "avg2+mask", "ckpt"])
    at.text_input(key="mem_extra").set_value("mask+avg4")  # typed: normalised, and used by both
    at.button(key="mem_measure").click().run()
    no_errors(at)
    assert list(at.dataframe[0].value["policy"]) == ["none", "avg2+mask", "ckpt", "avg4+mask"]
    assert "step time ×" not in at.dataframe[0].value  # untimed: no column of "None"
    # the page's figures are the meter's on that model and batch (measured here the direct way)
    from core.method.convert import compress_model
    from core.method.meter import saved_activation_bytes
    from core.models.resnet import build_model

    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    for policy, mib in zip(at.dataframe[0].value["policy"], at.dataframe[0].value["saved MiB"]):
        direct = saved_activation_bytes(compress_model(build_model("resnet20"), policy), x, y).total_bytes
        assert mib == round(direct / 2 ** 20, 1), policy
    at.button(key="mem_plan").click().run()
    no_errors(at)
    assert list(at.dataframe[-1].value["policy"]) == ["none", "avg2+mask", "ckpt", "avg4+mask"]
    assert "largest batch" in at.dataframe[-1].value
    # a policy a selected run trained with is drawn in that run's chip colour, the others in
    # colours no chip has (the planner drew avg2+mask red, beside the baseline's red chip)
    from core.analysis import plots
    from core.engine.runs import inspect_run
    from ui import common as ui

    chips = plots.selection_colors([r.name for r in ui.all_runs()], [
        r.name for r in map(inspect_run, at.session_state["selected_runs"])])
    chip_of = {inspect_run(p).config["policy"]: chips[inspect_run(p).name] for p in at.session_state["selected_runs"]}
    assert set(chip_of) == {"none", "avg2+mask"}
    drawn = {t["name"]: t["line"]["color"] for t in _chart(at, "Predicted training memory")["data"]
             if t.get("mode") == "lines"}
    assert {k: drawn[k] for k in chip_of} == chip_of
    assert not {drawn["ckpt"], drawn["avg4+mask"]} & set(chips.values()) and drawn["ckpt"] != drawn["avg4+mask"]
    assert not any("inside the backward" in c.value for c in at.caption)
    at.checkbox(key="mem_step_in_backward").check()
    at.button(key="mem_plan").click().run()
    no_errors(at)  # planned again, for training with the step inside the backward
    assert list(at.dataframe[-1].value["policy"]) == ["none", "avg2+mask", "ckpt", "avg4+mask"]
    assert any("the optimiser stepping inside the backward" in c.value for c in at.caption)


def test_memory_page_shows_where_a_step_peaks(app_env):
    """**Find the peak**: one profiled CPU step of the page's model and batch under the picked
    policy; the figure's bars are what was alive at the peak by maker and pass, and add up to at
    least that peak (what existed before the step and was freed before it counts in the peak only)."""
    at = page("memory")
    at.number_input(key="mem_batch").set_value(2)
    at.selectbox(key="mem_peak_policy").set_value("q4+mask+bn4")
    at.button(key="mem_peak").click().run()
    no_errors(at)
    spec = _chart(at, "Step peak of q4+mask+bn4")
    title = spec["layout"]["title"]["text"].replace("<br>", " ")
    peak_mib = float(title.split("q4+mask+bn4: ")[1].split(" ")[0])
    bars = {trace["name"]: trace for trace in spec["data"]}
    passes = {"made in the forward", "made in the backward"}
    assert passes <= set(bars) <= passes | {"smaller, either pass"}
    assert sum(sum(t["x"]) for t in bars.values()) >= peak_mib - 0.05
    assert any("CompressedConvFunction" in label for label in bars["made in the forward"]["y"])


def test_gradient_fidelity(app_env):
    at = page("fidelity")
    at.select_slider(key="fid_batch").set_value(8)
    at.multiselect(key="fid_settings").set_value(["avg2+mask", "max4+mask"])
    at.button(key="fid_go").click().run()
    no_errors(at)
    assert at.selectbox(key="fid_one").options == ["avg2+mask", "max4+mask"]


def test_gradient_fidelity_heatmap_matches_gradients_from_averaged_inputs(app_env):
    """The heatmap's avg2+mask cosines, recomputed another way: one exact pass captures each conv's
    input and output gradient; the weight gradient from the input averaged over 2x2 blocks and
    repeated back is compared with the one from the exact input. (The mask and the input gradient
    are exact under avg2+mask, so both share the output gradient.)"""
    from core.engine.runs.listing import inspect_run
    from core.engine.runs.reader import load_model
    from ui.common import pick_images, to_input

    run_dir = app_env / "tiny-avg2_mask"
    at = AppTest.from_file(str(ROOT / PAGES["fidelity"]), default_timeout=300)
    at.session_state["selected_runs"] = [str(run_dir)]
    at.run()
    at.select_slider(key="fid_batch").set_value(8)
    at.multiselect(key="fid_settings").set_value(["avg2+mask"])
    at.button(key="fid_go").click().run()
    no_errors(at)
    heat = next(t for c in at.get("plotly_chart") for t in json.loads(c.proto.spec)["data"] if t["type"] == "heatmap")
    shown = dict(zip(heat["y"], (row[0] for row in heat["z"])))

    run = inspect_run(run_dir)
    x_uint8, y, _, problem, _ = pick_images(run, 8)
    assert problem is None
    model = load_model(run_dir).train()
    seen = {}

    def keep(name):
        def hook(module, inputs, out):
            out.register_hook(lambda g: seen.__setitem__(name, (module, inputs[0].detach(), g)))
        return hook

    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(keep(name))
    torch.nn.functional.cross_entropy(model(to_input(x_uint8, run)), torch.as_tensor(y)).backward()
    assert set(seen) == set(shown)
    for name, (m, x, g) in seen.items():
        h, w = x.shape[2:]
        blocks = torch.nn.functional.avg_pool2d(x, 2, ceil_mode=True)
        x2 = blocks.repeat_interleave(2, 2).repeat_interleave(2, 3)[:, :, :h, :w]
        exact, approx = (torch.nn.grad.conv2d_weight(v, m.weight.shape, g, m.stride, m.padding).double().flatten()
                         for v in (x, x2))
        cosine = float(exact @ approx / (exact.norm() * approx.norm()))
        assert shown[name] == pytest.approx(cosine, abs=1e-4), name
    assert min(shown.values()) < 0.999  # pooling really changed some gradient


def test_the_fidelity_heatmap_of_another_run_is_not_shown_as_this_ones(app_env):
    """Computed for one run, then the page's run picker changed: the heatmap went on showing the
    previous run's gradients under the new choice. Now it waits for Compute."""
    at = page("fidelity")
    at.select_slider(key="fid_batch").set_value(8)
    at.multiselect(key="fid_settings").set_value(["avg2+mask"])
    at.button(key="fid_go").click().run()
    assert at.get("plotly_chart")
    first = at.selectbox(key="fid_run").value
    other = next(o for o in at.selectbox(key="fid_run").options if o != first)
    at.selectbox(key="fid_run").set_value(other).run()
    no_errors(at)
    charts = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    assert not any(t["type"] == "heatmap" for c in charts for t in c["data"])
    assert "Press **Compute** for " + other in texts(at.info)
    at.selectbox(key="fid_run").set_value(first).run()  # back to the run it answers: shown again
    assert any(t["type"] == "heatmap" for c in at.get("plotly_chart") for t in json.loads(c.proto.spec)["data"])


def test_memory_over_training_shows_what_cpu_runs_recorded(app_env):
    """CPU runs record no CUDA peak: the figure shows their saved bytes per step, from zero,
    instead of leaving the section empty."""
    at = page("memory")
    fig = next(json.loads(c.proto.spec) for c in at.get("plotly_chart")
               if "Memory over training" in str(json.loads(c.proto.spec)["layout"].get("title")))
    assert [t["name"] for t in fig["data"]] == ["none · 2 ep · s0 · saved activations",
                                               "avg2+mask · 2 ep · s0 · saved activations"]
    assert fig["layout"]["yaxis"]["rangemode"] == "tozero"


def test_filters_activation_maximisation_and_cka(app_env, monkeypatch):
    from core.analysis import activation_max

    calls = []

    def fake_maximize(model, layer, channels, steps=128, **kw):  # the real one: tests/test_features.py
        calls.append((layer, list(channels), steps))
        return np.full((len(channels), 32, 32, 3), 0.5)

    monkeypatch.setattr(activation_max, "maximize_activations", fake_maximize)
    at = page("filters")
    at.multiselect(key="ff_am_ch").set_value([0])
    at.select_slider(key="ff_am_steps").set_value(32)
    at.button(key="ff_am_go").click().run()
    no_errors(at)
    assert calls == [("layer3.2", [0], 32)]
    at.button(key="ff_spec_go").click().run()
    no_errors(at)
    assert at.selectbox(key="ff_spec_layer").value == "conv1"
    at.select_slider(key="ff_cka_n").set_value(64)
    at.button(key="ff_cka_go").click().run()
    no_errors(at)


@pytest.mark.parametrize("method", ["saliency", "gradcam"])
def test_attributions(app_env, method):
    at = page("attributions")
    at.number_input(key="att_n").set_value(2)
    at.selectbox(key="att_method").set_value(method)
    at.button(key="att_go").click().run()
    no_errors(at)
    at.radio(key="att_source").set_value("upload an image").run()
    assert "Upload an image" in texts(at.info)


def test_attributions_wait_for_the_button_when_the_selection_changes(app_env):
    at = page("attributions")
    at.number_input(key="att_n").set_value(1)
    at.button(key="att_go").click().run()
    assert at.get("plotly_chart"), "Explain drew no maps"
    at.run()  # any rerun (a widget elsewhere): the maps for the same request stay
    assert at.get("plotly_chart")
    at.session_state["selected_runs"] = [str(app_env / "tiny-avg2_mask")]
    at.run()  # another selection: nothing is recomputed until Explain is pressed
    no_errors(at)
    assert not at.get("plotly_chart")
    at.button(key="att_go").click().run()
    assert at.get("plotly_chart")


def test_attributions_large_pictures_redraw_the_same_maps_taller(app_env):
    """'Large pictures' (a wide screen): the same maps, taller rows, without pressing Explain again."""
    at = page("attributions")
    at.number_input(key="att_n").set_value(2)
    at.button(key="att_go").click().run()
    small = json.loads(at.get("plotly_chart")[0].proto.spec)
    at.toggle(key="att_large").set_value(True).run()
    no_errors(at)
    large = json.loads(at.get("plotly_chart")[0].proto.spec)
    assert [t["z"] for t in large["data"]] == [t["z"] for t in small["data"]]
    # two runs and the input: rows of 440 / 3 = 146 px fit 1024 px; large ones are 220 px
    assert large["layout"]["height"] - small["layout"]["height"] == 2 * (220 - 146)
# ---------------------------------------------------------------------------------------
# Helpers behind the pages
# ---------------------------------------------------------------------------------------

def _png(mode: str, size=(40, 30), color=None) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size, color if color is not None else 128).save(buf, "PNG")
    return buf.getvalue()


def test_upload_validation():
    from core.analysis.images import UploadError, image_from_upload

    img, notes = image_from_upload(_png("RGB", (64, 64), (255, 0, 0)))
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8 and tuple(img[0, 0]) == (255, 0, 0)
    assert any("resized from 64×64" in n for n in notes)
    for mode, word in (("L", "grayscale"), ("RGBA", "transparent"), ("I;16", "16-bit"), ("P", "palette")):
        img, notes = image_from_upload(_png(mode))
        assert img.shape == (32, 32, 3), mode
        assert any(word in n for n in notes), (mode, notes)
        assert any("centre square" in n for n in notes)
    with pytest.raises(UploadError, match="not an image"):
        image_from_upload(b"%PDF-1.4 this is not a picture")
    with pytest.raises(UploadError, match="empty"):
        image_from_upload(b"")
    with pytest.raises(UploadError, match="too large"):
        image_from_upload(_png("L", (9000, 8)))
    with pytest.raises(UploadError, match="7000×7000 pixels.*40 million pixels in all"):  # under 8000 a side
        image_from_upload(_png("L", (7000, 7000)))
    with pytest.raises(UploadError, match="damaged"):
        image_from_upload(_png("RGB", (64, 64))[:60])


def test_method_picture_and_bad_k():
    from core.analysis.method_picture import method_picture
    from core.models.resnet import build_model

    model = build_model("resnet20").eval()
    x = torch.randn(1, 3, 32, 32)
    pic = method_picture(model, "layer1.0.conv2", x, 2)
    assert pic["shape"] == (16, 32, 32) and pic["pooled"].shape == (16, 16)
    assert pic["bytes"]["pooled"] * 4 == pic["bytes"]["full"]
    assert pic["bytes"]["mask"] * 32 == pic["bytes"]["full"]  # a ReLU output: 1 bit instead of 32
    assert method_picture(model, "conv1", x, 1)["bytes"]["mask"] is None  # the image is no ReLU output
    with pytest.raises(ValueError, match="larger than the 4x4 feature map"):
        method_picture(model, "layer3.0.conv2", torch.randn(1, 3, 16, 16), 8)


def test_heldout_images_of_features10_are_its_validation_stream():
    from core.engine.data.registry import load_dataset
    from core.engine.data.samples import features10_heldout_name as _features10_heldout_name

    assert _features10_heldout_name("features10:train=64,val=32,seed=3", 5) == "features10:train=1,val=5,seed=3"
    a = load_dataset(_features10_heldout_name("features10:train=64,val=32", 8)).val_x
    b = load_dataset("features10:train=2,val=8").val_x
    assert torch.equal(a, b)


def test_another_image_set_gives_other_features10_images():
    """The Attributions page's "Set" number: each set is n other held-out images."""
    from core.engine.data.samples import heldout_images

    first, labels, _ = heldout_images("features10", 4, 0, 0)
    again = heldout_images("features10", 4, 0, 0)[0]
    other = heldout_images("features10", 4, 0, 1)[0]
    assert first.shape == other.shape == (4, 3, 32, 32) and len(labels) == 4
    assert (first == again).all() and not (first == other).all()



def test_live_progress_reads_the_last_step_of_short_and_long_metrics(tmp_path):
    """A run that has logged one step shows step 1 (the first line of a short file counts), and a
    long file is read from its tail only, without its cut first line."""
    from core.engine.runs import live_progress
    from core.engine.runs import tail_records as _tail_records

    (tmp_path / "config.json").write_text(json.dumps({"total_steps": 100, "epochs": 2}))
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"type": "step", "step": 1, "loss": 2.3}) + "\n")
    assert live_progress(tmp_path)["step"] == 1
    lines = [json.dumps({"type": "step", "step": i, "loss": 2.0, "pad": "x" * 50}) for i in range(1, 501)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    tail = _tail_records(tmp_path / "metrics.jsonl")
    assert tail[-1]["step"] == 500 and 50 < len(tail) < 500
    assert [r["step"] for r in tail] == list(range(501 - len(tail), 501))
    assert live_progress(tmp_path)["step"] == 500

def test_csv_and_default_selection(runs_dir):
    from core.analysis.run_views import default_selection
    from core.engine.runs.listing import list_runs
    from ui.common import csv_bytes

    assert csv_bytes([{"a": 1, "b": None}, {"a": 2, "c": "x"}]).decode().splitlines() == ["a,b,c", "1,,", "2,,x"]
    runs = list_runs([runs_dir], include_default=False)
    sel = default_selection(runs)
    assert len(sel) == 2 and sel[0].endswith("tiny-none")  # the baseline first


def test_default_selection_prefers_real_images_and_one_run_per_policy(tmp_path):
    """Two shipped groups of four: the real-image one wins, and it shows baseline, avg2 and avg4
    from its usual 20-epoch schedule, not the baseline twice."""
    from core.analysis.run_views import default_selection
    from core.engine.runs.reader import Run

    def run(dataset: str, policy: str, epochs: int) -> Run:
        path = tmp_path / f"{dataset.split(':')[0]}-{policy}-e{epochs}"
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"")
        return Run(path=path, name=path.name, config={"model": "resnet20", "dataset": dataset, "policy": policy,
                                                      "epochs": epochs}, status="finished", is_shipped=True)

    built_in = [run("features10", p, 4) for p in ("none", "avg2+mask", "avg4+mask", "avg8+mask")]
    real = [run("imagefolder:cifar", p, e) for p, e in
            (("none", 30), ("avg4+mask", 20), ("none", 20), ("avg2+mask", 20))]
    assert [Path(s).name for s in default_selection(built_in + real)] == [
        "imagefolder-none-e20", "imagefolder-avg2+mask-e20", "imagefolder-avg4+mask-e20"]
    assert [Path(s).name for s in default_selection(built_in + real, n=4)][-1] == "imagefolder-none-e30"
    assert [Path(s).name for s in default_selection(built_in)][0] == "features10-none-e4"


def test_home_is_quick_once_warm(app_env):
    page("home")
    t0 = time.perf_counter()
    page("home")
    assert time.perf_counter() - t0 < 10  # generous: the test machine is shared


SHIPPED_CIFAR = sorted((ROOT / "checkpoints").glob("r20-cifar-*"))
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _figure_texts(at: AppTest) -> list[str]:
    """Every annotation (subplot titles included) of the figures a page drew."""
    return [a.get("text", "") for c in at.get("plotly_chart")
            for a in json.loads(c.proto.spec).get("layout", {}).get("annotations", [])]


@pytest.fixture
def fresh_clone(tmp_path, monkeypatch):
    """The app as a fresh clone shows it: the shipped runs, and no .data folder (the runs' configs
    name .data/cifar10-jpeg/train, relative to where the app runs)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("POOLPROP_RUN_DIRS", str(ROOT / "checkpoints"))
    monkeypatch.setenv("POOLPROP_RUNS_ROOT", str(tmp_path / "new_runs"))
    return tmp_path


@pytest.mark.skipif(len(SHIPPED_CIFAR) < 2, reason="fewer than two shipped CIFAR runs")
def test_shipped_cifar_runs_use_the_shipped_cifar_images_on_a_fresh_clone(fresh_clone):
    """Without the CIFAR-10 data the default CIFAR runs are shown on the shipped sample of its
    validation split, never on the built-in noise patterns: no "not available here" warning,
    a note that says where the images come from, and CIFAR-10 class names."""
    for name in PAGES:
        at = AppTest.from_file(str(ROOT / PAGES[name]), default_timeout=300)
        at.run()
        no_errors(at)
        assert [Path(p).name for p in at.session_state["selected_runs"]][0].startswith("r20-cifar-none-e20")
        if name == "home":
            shown = texts(at.markdown)
            assert any(f"Image: *{c}*" in shown for c in CIFAR_CLASSES), shown
            assert "shipped sample" in texts(at.caption)
        if name == "fidelity":
            at.select_slider(key="fid_batch").set_value(8)
            at.multiselect(key="fid_settings").set_value(["avg2+mask"])
            at.button(key="fid_go").click().run()
            no_errors(at)
            assert "shipped sample" in texts(at.caption)
        if name == "attributions":
            at.number_input(key="att_n").set_value(2)
            at.button(key="att_go").click().run()
            no_errors(at)
            titles = " ".join(_figure_texts(at))
            assert "target<br>" in titles and any(c in titles for c in CIFAR_CLASSES), titles
        assert "not available here" not in texts(at.warning), (name, texts(at.warning))


@pytest.mark.skipif(len(SHIPPED_CIFAR) < 2, reason="fewer than two shipped CIFAR runs")
def test_attributions_name_cifar_predictions_with_cifar_classes_on_built_in_images(fresh_clone):
    """The built-in (features10) images through CIFAR-10 models: every prediction, and what the
    maps explain, is named with CIFAR-10's classes, never with the built-in set's."""
    from core.engine.data import FEATURES10_CLASSES

    at = AppTest.from_file(str(ROOT / PAGES["attributions"]), default_timeout=300)
    at.run()
    at.radio(key="att_source").set_value("built-in set").run()
    at.number_input(key="att_n").set_value(3)
    at.button(key="att_go").click().run()
    no_errors(at)
    titles = _figure_texts(at)
    words = {w for t in titles for w in t.replace("<br>", " ").split()}
    assert words & set(CIFAR_CLASSES), titles
    assert not words & {c["name"] for c in FEATURES10_CLASSES}, titles


def test_home_table_and_pareto_show_the_accuracy_the_weights_score():
    """The last epoch's accuracy, as in the README's table, not the best epoch's (which no
    shipped weights have); the dataset by its short name."""
    from core.engine.runs.listing import list_runs
    from ui import common as ui

    runs = [r for r in list_runs([ROOT / "checkpoints"], include_default=False) if r.ok]
    last = {str(r.path): r.summary["last_val_acc"] for r in runs}
    # the shipped runs include ones whose best epoch was not the last, so the check can tell
    assert any(round(100 * r.summary["best_val_acc"], 1) != round(100 * last[str(r.path)], 1) for r in runs)
    table = ui.runs_table(runs)
    assert [row["accuracy %"] for row in table] == [round(100 * last[row["folder"]], 1) for row in table]
    assert {row["dataset"] for row in table} == {"cifar10-jpeg/train", "features10"}
    labels = {row["run"]: row["folder"] for row in table}
    pareto = ui.pareto_rows(runs)
    assert len(pareto) == len(runs)
    assert all(p["acc"] == last[labels[p["name"]]] for p in pareto)


def test_labels_name_what_differs_then_the_start_time(tmp_path):
    from core.engine.runs.listing import run_labels as labels
    from core.engine.runs.reader import Run

    def run(name, epochs, created):
        return Run(path=tmp_path / name, name=name, status="finished", config={
            "model": "resnet20", "policy": "none", "dataset": "features10", "epochs": epochs, "created": created})

    runs = [run("a", 20, "2026-11-28T10:00:00"), run("b", 30, "2026-11-28T11:00:00"),
            run("c", 30, "2026-11-28T12:00:00"), run("d", 4, "2026-11-28T13:00:00")]
    assert list(labels([runs[0], runs[3]]).values()) == ["none · features10 · 20 ep", "none · features10 · 4 ep"]
    assert list(labels([runs[1], runs[2]]).values()) == ["none · features10 · 11:00:00", "none · features10 · 12:00:00"]
    other = Run(path=tmp_path / "e", name="e", status="finished", config={
        "model": "resnet20", "policy": "avg2+mask", "dataset": "features10", "epochs": 4, "seed": 1})
    assert list(labels([runs[0], other]).values()) == ["none · features10 · 20 ep · s0",
                                                       "avg2+mask · features10 · 4 ep · s1"]
    assert list(labels(runs).values()) == ["none · features10 · 20 ep", "none · features10 · 30 ep · 11:00:00",
                                           "none · features10 · 30 ep · 12:00:00", "none · features10 · 4 ep"]
    # alike to the second, even in folder name: the folder above tells them apart
    twins = [Run(path=tmp_path / parent / "a", name="a", status="finished", config=runs[0].config)
             for parent in ("checkpoints", "shipped")]
    assert list(labels(twins).values()) == ["none · features10 · 10:00:00 (checkpoints/a)",
                                            "none · features10 · 10:00:00 (shipped/a)"]


# ---------------------------------------------------------------------------------------
# Runs grouped by setting, comparable defaults, the picker (against the shipped runs)
# ---------------------------------------------------------------------------------------

@pytest.fixture
def shipped_env(tmp_path, monkeypatch):
    monkeypatch.setenv("POOLPROP_RUN_DIRS", str(ROOT / "checkpoints"))
    monkeypatch.setenv("POOLPROP_RUNS_ROOT", str(tmp_path / "new_runs"))
    return ROOT / "checkpoints"


def _chart(at: AppTest, title: str) -> dict:
    for c in at.get("plotly_chart"):
        spec = json.loads(c.proto.spec)
        if title in str(spec.get("layout", {}).get("title", {}).get("text", "")):
            return spec
    raise AssertionError(f"no figure titled {title!r}")


@pytest.mark.skipif(len(SHIPPED_CIFAR) < 2, reason="fewer than two shipped CIFAR runs")
def test_default_runs_are_of_one_device_and_recipe(shipped_env):
    """The shipped 20-epoch baseline of seed 0 was trained on an H200 in bf16, the other CIFAR
    runs on the CPU: the defaults compare like with like (seed 1 of the baseline)."""
    at = page("loss")
    picked = [Path(p).name for p in at.session_state["selected_runs"]]
    assert picked == ["r20-cifar-none-e20-s1", "r20-cifar-avg2+mask-e20-s0", "r20-cifar-avg4+mask-e20-s0"]
    assert set(at.dataframe[0].value["trained on"]) == {"CPU, float32"}


@pytest.mark.skipif(len(SHIPPED_CIFAR) < 2, reason="fewer than two shipped CIFAR runs")
def test_seeds_of_a_setting_are_one_band_and_a_toggle_shows_them_apart(shipped_env):
    at = AppTest.from_file(str(ROOT / PAGES["loss"]), default_timeout=300)
    at.session_state["selected_runs"] = [str(shipped_env / n) for n in (
        "r20-cifar-none-e20-s0", "r20-cifar-none-e20-s1", "r20-cifar-avg2+mask-e20-s0")]
    at.run()
    no_errors(at)
    fig = _chart(at, "Validation accuracy")
    shown = [t["name"] for t in fig["data"] if t.get("showlegend") is not False]
    assert shown == ["none · 20 ep (2 seeds)", "avg2+mask · 20 ep · s0"]
    assert any(t.get("fill") == "tonexty" for t in fig["data"])
    assert "none · 20 ep (2 seeds)" in list(at.dataframe[0].value["run"])
    # against wall time the two seeds' devices differ (an H200 and the CPU): the figure says so
    at.radio(key="lc_x").set_value("wall").run()
    notes = " ".join(a["text"] for a in _chart(at, "Validation accuracy")["layout"].get("annotations", []))
    assert "Different devices" in notes and "H200" in notes
    at.toggle(key="seeds_apart").set_value(True).run()
    fig = _chart(at, "Validation accuracy")
    assert [t["name"] for t in fig["data"] if t.get("showlegend") is not False] == [
        "none · 20 ep · s0", "none · 20 ep · s1", "avg2+mask · 20 ep · s0"]
    assert not any(t.get("fill") for t in fig["data"])


@pytest.mark.skipif(len(SHIPPED_CIFAR) < 2, reason="fewer than two shipped CIFAR runs")
def test_the_pareto_plot_compares_one_schedule_by_default(shipped_env):
    at = page("home")
    assert at.selectbox(key="home_pareto_epochs").value == 20
    fig = _chart(at, "Accuracy vs memory")
    markers = [t for t in fig["data"] if t.get("mode") == "markers+text"]
    assert markers and all("20 ep" in t["name"] for t in markers)
    assert [t["name"] for t in fig["data"] if t.get("mode") == "lines"] == ["Pareto front"]
    seeds = next(t for t in markers if t["name"] == "none · 20 ep (2 seeds)")
    assert seeds["error_y"]["array"][0] > 0  # the two seeds' range
    at.selectbox(key="home_pareto_epochs").set_value("all").run()
    fronts = [t["name"] for t in _chart(at, "Accuracy vs memory")["data"] if t.get("mode") == "lines"]
    assert "Pareto front · 20 ep" in fronts and "Pareto front · 30 ep" in fronts


@pytest.mark.skipif(len(SHIPPED_CIFAR) < 2, reason="fewer than two shipped CIFAR runs")
def test_the_picker_filters_and_colours_and_names_runs_in_full(shipped_env):
    """18 shipped runs: a filter by schedule and family narrows what the picker offers (the picked
    runs stay); names say setting · epochs · seed; each chip gets its run's colour (CSS the
    browser applies; the browser test checks what it shows)."""
    from core.analysis import plots
    from core.engine.runs import inspect_run
    from ui import common as ui
    from ui.picker import PICKER_KEY

    at = page("home")
    picked = {"none · 20 ep · s1", "avg2+mask · 20 ep · s0", "avg4+mask · 20 ep · s0"}
    picker = at.multiselect(key=PICKER_KEY)
    assert {picker.format_func(p) for p in picker.value} == picked
    at.selectbox(key="_filter_epochs").set_value(30).run()
    offered = set(at.multiselect(key=PICKER_KEY).options)
    assert offered - picked == {"none · 30 ep · s0", "avg2+mask · 30 ep · s0", "avg4+mask · 30 ep · s0"}
    at.selectbox(key="_filter_family").set_value("baseline").run()
    assert set(at.multiselect(key=PICKER_KEY).options) - picked == {"none · 30 ep · s0"}
    at.selectbox(key="_filter_data").set_value("features10").run()
    assert set(at.multiselect(key=PICKER_KEY).options) == picked  # no 30-epoch features10 baseline
    css = " ".join(h.value for h in at.get("html"))
    runs = [inspect_run(p) for p in at.session_state["selected_runs"]]
    chips = plots.selection_colors([r.name for r in ui.all_runs()], [r.name for r in runs])
    for i, r in enumerate(runs):
        assert f'[data-tag-index="{i}"]' in css and f"border: 2px solid {chips[r.name]}" in css
    # the front of every 20-epoch run draws a picked run's setting in its chip's colour, the
    # other settings in colours no chip has (it drew the baseline pink beside a red chip)
    at.selectbox(key="_filter_data").set_value("all").run()
    setting_of = {"none · 20 ep · s1": "none · 20 ep (2 seeds)",
                  "avg2+mask · 20 ep · s0": "avg2+mask · 20 ep (2 seeds)",
                  "avg4+mask · 20 ep · s0": "avg4+mask · 20 ep · s0"}
    drawn = {t["name"]: t["marker"]["color"] for t in _chart(at, "Accuracy vs memory")["data"] if t.get("marker")}
    for r, name in zip(runs, ui.names_of(runs)):
        assert drawn[setting_of[name]] == chips[r.name], name
    assert not {c for n, c in drawn.items() if n not in setting_of.values()} & set(chips.values())


def test_families_are_offered_and_their_bias_shown(app_env):
    """The Train page offers the families; the fidelity page shows each setting's bias over
    draws: the codes' bias is what their noise explains (near its floor), pooling's is its error."""
    at = page("train")
    by_label = {b.label: b for b in at.selectbox}
    assert {"q4+mask+bn4", "q2+mask+bn2", "avg2+res2+mask+bn4"} <= set(by_label["Policy"].options)
    assert "torchvision:efficientnet_b0" in by_label["Model"].options
    at = page("fidelity")
    at.select_slider(key="fid_batch").set_value(8)
    at.multiselect(key="fid_settings").set_value(["avg2+mask", "q2+mask+bn2"])
    at.radio(key="fid_metric").set_value("bias")
    at.button(key="fid_go").click().run()
    no_errors(at)
    fig = json.loads(at.get("plotly_chart")[0].proto.spec)
    z = np.array(fig["data"][0]["z"], dtype=float)  # layers x (avg2+mask, q2+mask+bn2)
    caption = " ".join(c.value for c in at.caption)
    assert "bias floor" in caption and "q2+mask+bn2" in caption
    assert np.nanmean(z[:, 0]) > 0.2  # pooling: biased, every draw the same
    floor = float(re.search(r"q2\+mask\+bn2 (\d+\.\d+)", caption)[1])
    assert abs(np.nanmean(z[:, 1]) - floor) < 0.5 * floor  # the codes: near what the noise explains


def test_memory_planner_answers_for_a_torchvision_model_and_a_card(app_env):
    at = page("memory")
    at.selectbox(key="mem_model").set_value("torchvision:mobilenet_v2")
    at.select_slider(key="mem_size").set_value(64)
    at.multiselect(key="mem_policies").set_value(["none", "q4+mask+bn4"])
    at.select_slider(key="mem_budget").set_value(4)
    at.number_input(key="mem_check_batch").set_value(64)
    at.button(key="mem_plan").click().run()
    no_errors(at)
    sentence = " ".join(m.value for m in at.markdown)
    assert "torchvision:mobilenet_v2 at 64 px, batch 64, on a 4 GiB card" in sentence
    assert "`none` →" in sentence and "`q4+mask+bn4` →" in sentence
    table = at.dataframe[-1].value
    assert list(table["policy"]) == ["none", "q4+mask+bn4"]
    assert table["largest batch"][1] > table["largest batch"][0]  # the codes fit more on the same card
