"""The forward-only meter (core.method.meter), the ladder and the planner (core.analysis) and their figures.

Small on purpose: ResNet-20 at small batches; ResNet-18 only once, at batch 128 (marked slow)."""

import json

import pytest
import torch

from core.analysis import plots
from core.analysis.memory_ladder import BEST_POLICY, LADDER_POLICIES, OUTSIDE, memory_ladder
from core.analysis.planner import GIB, MemoryPlan, largest_batch, largest_batches, plan_memory, training_peak
from core.method.convert import compress_model, model_policy
from core.method.meter import KINDS, model_state_bytes, saved_activation_bytes
from core.method.meter import saved_activation_bytes as forward_saved_bytes
from core.models.resnet import build_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ladder8():
    return memory_ladder("resnet20", 8, time_steps=False)


def _batch(n, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_forward_only_meter_matches_full_meter():
    model = build_model("resnet20")
    x, y = _batch(2, size=16)
    for policy in ("none", "avg2+mask+bn8", "ckpt"):
        compress_model(model, policy)
        fwd, full = forward_saved_bytes(model, x, y), saved_activation_bytes(model, x, y)
        assert fwd.total_bytes == full.total_bytes and fwd.by_kind == full.by_kind
        assert fwd.by_layer_kind == full.by_layer_kind
    compress_model(model, "none")


def test_forward_only_meter_frees_the_graph():
    """Without backward, a saved output (ReLU's) must not keep the graph alive in a cycle."""
    import weakref

    model = build_model("resnet20")
    alive = []
    handle = model.layer1[0].act1.register_forward_hook(lambda m, a, out: alive.append(weakref.ref(out)))
    try:
        forward_saved_bytes(model, *_batch(2))
    finally:
        handle.remove()
    assert len(alive) == 1 and alive[0]() is None  # freed at once, no garbage collection needed


def test_forward_only_meter_leaves_model_alone():
    model = build_model("resnet20").eval()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    forward_saved_bytes(model, *_batch(2))
    assert not model.training
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())


def test_ladder_totals_match_the_meter(ladder8):
    assert ladder8.policies == list(LADDER_POLICIES) and BEST_POLICY in ladder8.policies
    x, y = _batch(8)  # the ladder's own batch (same seed, same shapes: bytes depend on shapes only)
    for step in ladder8.steps:
        model = build_model("resnet20")
        compress_model(model, step.policy)
        rep = saved_activation_bytes(model, x, y)
        assert step.total_bytes == rep.total_bytes, step.policy
        assert sum(step.by_kind.values()) == step.total_bytes
        assert sum(step.by_layer.values()) == step.total_bytes
        assert sum(n for d in step.by_layer_kind.values() for n in d.values()) == step.total_bytes
        for kind in step.by_kind:
            assert kind in KINDS
            assert sum(d.get(kind, 0) for d in step.by_layer_kind.values()) == step.by_kind[kind]
    layers = ladder8.layers
    assert layers[0] == "conv1" and "fc" in layers and set(layers) >= set(ladder8.step("none").by_layer)
    assert OUTSIDE in layers  # the loss keeps its log-softmax


def test_ladder_steps(ladder8):
    cut = {s.policy: s.cut for s in ladder8.steps}
    assert cut["none"] == 0
    assert cut["avg2"] < 0  # the pooled copy is extra while ReLU and BN keep full tensors
    assert cut["mask"] <= 0.01  # the conv still keeps the ReLU output: nothing freed
    assert cut["avg2+mask"] >= 0.30
    assert cut[BEST_POLICY] > cut["avg2+mask"]
    assert cut["ckpt"] > 0.5
    assert "checkpoint input" in ladder8.step("ckpt").by_kind
    assert ladder8.step("mask").by_kind["ReLU state"] * 20 < ladder8.step("none").by_kind["ReLU state"]
    rows = ladder8.to_rows()
    assert sum(r["bytes"] for r in rows if r["policy"] == "avg2") == ladder8.step("avg2").total_bytes
    assert [r["policy"] for r in ladder8.summary_rows()] == ladder8.policies
    json.dumps(ladder8.to_dict())
    with pytest.raises(KeyError):
        ladder8.step("avg8")


def test_ladder_timing_and_skips():
    lad = memory_ladder("resnet20", 2, size=8, policies=("avg2+mask", "avg4+mask"), time_steps=True,
                        time_repeats=1)
    assert lad.policies == ["none", "avg2+mask"]  # "none" added first; avg4 does not fit 2x2 maps
    assert "larger than the 2x2 feature map" in lad.skipped["avg4+mask"]
    assert lad.step("none").time_ratio == 1.0 and lad.step("avg2+mask").time_ratio > 0
    assert lad.timing["repeats"] == 1


def test_ladder_keeps_a_given_model_as_it_was():
    model = build_model("resnet20")
    compress_model(model, "max2")
    memory_ladder(model, 2, size=8, policies=("none", "avg2+mask"), time_steps=False)
    assert str(model_policy(model)) == "max2"


@pytest.mark.parametrize("policy", ["none", "avg2+mask", "q2+mask+bn2"])
def test_planner_predicts_saved_bytes_and_the_step_peak_at_128_resnet20(policy):
    """Fitted at batches 8-32, predicted at 128: the saved bytes against the meter, the whole
    peak (state + saved + the backward's transients) against a real step's profiler peak."""
    plan = plan_memory("resnet20", policy)
    assert plan.fit_batches == [8, 16, 24, 32] and plan.peak_fit is None and plan.transient_fit is not None
    model = build_model("resnet20")
    compress_model(model, policy)
    measured = forward_saved_bytes(model, *_batch(128)).total_bytes
    assert plan.predict_saved(128) == pytest.approx(measured, rel=0.05)
    state = model_state_bytes(model, "sgd")
    step_peak = training_peak(model, 128, 32, 10, "sgd", "cpu")  # includes the gradients it allocates
    assert plan.predict(128) == pytest.approx(state["params"] + state["optimizer"] + step_peak, rel=0.1)
    assert plan.predict(128) > measured + state["total"]  # the transients are real


def test_planner_line_goes_through_the_measured_peaks_even_below_saved_plus_gradients():
    # ResNet-20 at batches 4 and 8: its 1 MiB of gradients outweighs the working set, so the
    # transients are negative; clamped at 0 they hid the working set's growth with the batch
    plan = plan_memory("resnet20", "avg2+mask", fit_batches=(4, 8))
    assert min(plan.transient_bytes) < 0
    model = compress_model(build_model("resnet20"), "avg2+mask")
    state = model_state_bytes(model, "sgd")
    for batch in (4, 8):
        peak = training_peak(model, batch, 32, 10, "sgd", "cpu")
        assert plan.predict(batch) == pytest.approx(state["params"] + state["optimizer"] + peak, rel=0.01)
    assert plan.transient_fit[1] > 0  # the working set grows with the batch


@pytest.mark.slow
def test_planner_predicts_saved_bytes_at_128_resnet18():
    """The one heavy measurement (~1.5 GFLOP x 128 forward): resnet18, CIFAR stem, avg2+mask."""
    plan = plan_memory("resnet18", "avg2+mask", fit_batches=(8, 32))
    model = build_model("resnet18")
    compress_model(model, "avg2+mask")
    measured = forward_saved_bytes(model, *_batch(128)).total_bytes
    assert plan.predict_saved(128) == pytest.approx(measured, rel=0.05)


def test_largest_batch_is_monotone_and_tight():
    plan = plan_memory("resnet20", "avg2+mask", fit_batches=(2, 4), optimizer="adamw", transients=False)
    assert plan.model_state["optimizer"] == 2 * plan.model_state["params"]
    budgets = [0, 1e6, 5e6, 2e7, 1e8, 1e9, 8 * GIB]
    sizes = [largest_batch(plan, b) for b in budgets]
    assert sizes == sorted(sizes) and sizes[0] == 0 and sizes[-1] > 1000
    for b, n in zip(budgets, sizes):
        if n:
            assert plan.predict(n) <= b < plan.predict(n + 1)
    d = plan.to_dict()
    json.dumps(d)
    assert "lower bound" in d["measure"]
    rows = largest_batches("resnet20", ("none", "avg2+mask"), budgets_gb=(1, 4), fit_batches=(2, 4))
    by = {(r["policy"], r["budget_gb"]): r["largest_batch"] for r in rows}
    assert by["avg2+mask", 4] > by["none", 4] > by["none", 1] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_planner_matches_cuda_peak():
    """Fit the peak at 64-128, predict 512 (an H200 gave -7.5..+0.6% for these cases)."""
    from core.analysis.planner import training_peak

    for name, policy in (("resnet20", "none"), ("resnet20", "avg2+mask"), ("resnet18", "avg2+mask+bn8")):
        plan = plan_memory(name, policy, device="cuda")
        assert plan.peak_fit is not None and plan.peak_fit_batches == [64, 96, 128]
        model = build_model(name).cuda()
        compress_model(model, policy)
        measured = training_peak(model, 512, 32, 10, "sgd", "cuda")
        assert plan.predict(512) == pytest.approx(measured, rel=0.10), (name, policy)
        assert plan.model_state["total"] + plan.predict_saved(512) <= measured  # the meter's figure is a lower bound
        del model
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------
# figures
# ---------------------------------------------------------------------------------------

def test_memory_ladder_figure(ladder8):
    fig = plots.memory_ladder_figure(ladder8)
    bars = [t for t in fig.data if t.type == "bar"]
    assert {t.name for t in bars} == {k for s in ladder8.steps for k in s.by_kind}
    assert fig.layout.barmode == "stack" and list(bars[0].x) == ladder8.policies
    text = [t for t in fig.data if t.type == "scatter"][0].text
    cut = ladder8.step("avg2+mask").cut
    assert f"{-100 * cut:+.0f}%" in text[ladder8.policies.index("avg2+mask")] and "-" in f"{-100 * cut:+.0f}"
    lad = ladder8.to_dict()
    lad["steps"][1]["time_ratio"] = 1.25
    fig = plots.memory_ladder_figure(lad)
    assert "×1.25 time" in fig.data[-1].text[1]


def test_planner_figure():
    plans = [MemoryPlan(model="m", policy=p, size=32, optimizer="sgd", stem="cifar", device="cpu",
                        fit_batches=[8, 16], saved_bytes=[0, 0], saved_fit=(1e6, b),
                        model_state={"params": 0, "grads": 0, "optimizer": 0, "total": 1e7})
             for p, b in (("none", 4e6), ("avg2+mask", 2e6))]
    fig = plots.planner_figure(plans, budget=1e9)
    lines = [t for t in fig.data if t.mode == "lines"]
    marks = [t for t in fig.data if t.mode == "markers+text"]
    assert [t.name for t in lines] == ["none", "avg2+mask"]
    assert [int(t.x[0]) for t in marks] == [largest_batch(p, 1e9) for p in plans]
    assert len(fig.layout.shapes) == 1 and fig.layout.shapes[0].y0 == pytest.approx(1e9 / GIB)
