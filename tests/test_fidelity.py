"""core.analysis.fidelity: exact vs compressed gradients per layer, the sweep, training records, the CLI
and the fidelity figures. Kept small: ResNet-20 on a few images, tiny custom nets."""

import contextlib
import io
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core.analysis import plots
from core.analysis.fidelity import FidelityResult, compare_gradients, sweep, sweep_settings
from core.analysis.fidelity_history import fidelity_over_training
from core.method.convert import compress_model, model_policy
from core.method.gradients import METRICS
from core.models.resnet import build_model

from helpers import block_constant

pytestmark = pytest.mark.usefixtures("one_thread")


class BlockNet(nn.Module):
    """Conv/BN/ReLU net in which every conv sees a block-constant input when x is one:
    1x1 convs, per-channel BN and ReLU keep block-constancy; the 3x3 conv comes last.
    With `last3x3=False` every layer is 1x1, so output gradients are block-constant too."""

    def __init__(self, last3x3=True):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.act2 = nn.ReLU()
        self.conv3 = nn.Conv2d(8, 8, 3 if last3x3 else 1, padding=1 if last3x3 else 0, bias=False)
        self.bn3 = nn.BatchNorm2d(8)
        self.act3 = nn.ReLU()
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.act3(self.bn3(self.conv3(x)))
        return self.fc(x.mean((2, 3)))


def features_batch(n=16, seed=0):
    """features10 images (real spatial structure), normalised per batch; smooth noise if data is absent."""
    try:
        from core.engine.data.features10 import generate_features10

        x, y = generate_features10(n, seed=seed)
        x = x.float() / 255
    except ImportError:  # pragma: no cover - data module missing
        g = torch.Generator().manual_seed(seed)
        x = F.interpolate(torch.randn(n, 3, 8, 8, generator=g), size=32, mode="bilinear")
        y = torch.randint(0, 10, (n,), generator=g)
    x = (x - x.mean((0, 2, 3), keepdim=True)) / x.std((0, 2, 3), keepdim=True)
    return x, y


@pytest.fixture(scope="module")
def r20():
    torch.manual_seed(0)
    return build_model("resnet20")


@pytest.fixture(scope="module")
def r20_result(r20):
    """One comparison reused by several tests (batch 16 of features10, at init)."""
    x, y = features_batch(16)
    return compare_gradients(r20, x, y, ["avg1+mask", "avg2", "max2", "avg2-lowres", "avg2+bn8"])


def test_k1_is_exact(r20_result):
    res = r20_result
    m = res.metrics["avg1+mask"]
    assert len(m["cosine"]) == len(res.layers) == 19  # every conv of ResNet-20
    for i in range(len(res.layers)):
        assert m["cosine"][i] == pytest.approx(1, abs=1e-6)
        assert m["rel_error"][i] == pytest.approx(0, abs=1e-5)
        assert m["sign_agreement"][i] == pytest.approx(1, abs=1e-6)
        assert m["projection"][i] == pytest.approx(1, abs=1e-5)
    assert res.input_rel_error["avg1+mask"] < 1e-5


def test_avg_shrinks_max_inflates(r20_result):
    mean_proj = r20_result.mean("projection")
    mean_norm = r20_result.mean("norm_ratio")
    assert mean_proj["avg2"] < 1 and mean_norm["avg2"] < 1  # smoothing loses part of the gradient
    assert mean_proj["max2"] > 1 and mean_norm["max2"] > 1  # block maxima overstate it
    assert mean_proj["avg2-lowres"] < 1
    for s in ("avg2", "max2", "avg2-lowres"):
        cos = r20_result.mean("cosine")[s]
        assert 0 < cos < 0.999  # an estimate, not the gradient


def test_input_gradient_exact_under_full_bn_only(r20_result):
    rel = r20_result.input_rel_error
    assert rel["avg2"] < 1e-5 and rel["avg2-lowres"] < 1e-5 and rel["max2"] < 1e-5
    assert rel["avg2+bn8"] > 1e-4  # float8 BN storage perturbs the input gradient


def test_model_left_untouched(r20):
    x, y = features_batch(4)
    model = r20
    compress_model(model, "max2+mask")
    model.eval()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5) if p.dim() == 4 else None
    grads = {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    compare_gradients(model, x, y, ["avg2", "avg4-lowres+mask+bn8"])
    assert str(model_policy(model)) == "max2+mask"
    assert not model.training
    for n, p in model.named_parameters():
        assert torch.equal(p, params[n])
        assert (p.grad is None) == (grads[n] is None) and (p.grad is None or torch.equal(p.grad, grads[n]))
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), n
    compress_model(model, "none")
    for p in model.parameters():
        p.grad = None


@pytest.mark.parametrize("pool", ["avg", "max"])
def test_upsample_exact_for_block_constant_inputs(pool):
    torch.manual_seed(1)
    net = BlockNet(last3x3=True).double()
    x = block_constant((4, 3, 8, 8), 4)
    y = torch.randint(0, 5, (4,))
    res = compare_gradients(net, x, y, [f"{pool}2", f"{pool}4"])
    for s in res.settings:
        for i in range(3):
            assert res.metrics[s]["cosine"][i] == pytest.approx(1, abs=1e-10)
            assert res.metrics[s]["rel_error"][i] < 1e-9
        assert res.input_rel_error[s] < 1e-9
        assert res.compressed[s] == [True, True, True]


def test_lowres_exact_when_inputs_and_gradients_are_block_constant():
    torch.manual_seed(2)
    net = BlockNet(last3x3=False).double()
    x = block_constant((4, 3, 8, 8), 4, seed=3)
    y = torch.randint(0, 5, (4,))
    res = compare_gradients(net, x, y, ["avg2-lowres", "avg4-lowres", "max4-lowres"])
    for s in res.settings:
        assert max(res.metrics[s]["rel_error"]) < 1e-9, s
    # and not exact for a generic input (the test can fail)
    res = compare_gradients(net, torch.randn(4, 3, 8, 8, dtype=torch.float64), y, ["avg2-lowres"])
    assert max(res.metrics["avg2-lowres"]["rel_error"]) > 1e-3


def test_sweep_narrows_or_skips_settings_that_do_not_fit():
    torch.manual_seed(0)
    model = build_model("resnet20")
    x, y = torch.randn(2, 3, 16, 16), torch.randint(0, 10, (2,))  # stages at 16, 8, 4
    res = sweep(model, x, y, ks=(1, 8), pools=("avg",), modes=("upsample",))
    assert res.settings == ["avg1+mask", "avg8+mask"]
    assert res.applied["avg8+mask"] == "avg8+mask+stages=1,2"
    assert "4x4" in res.notes["avg8+mask"]
    comp = dict(zip(res.layers, res.compressed["avg8+mask"]))
    assert comp["layer1.0.conv1"] and comp["layer2.0.conv1"] and not comp["layer3.0.conv2"] and not comp["conv1"]
    # layers left exact really are exact (input gradients are exact, so their output gradients are)
    i = res.layers.index("layer3.2.conv2")
    assert res.metrics["avg8+mask"]["cosine"][i] == pytest.approx(1, abs=1e-5)
    # a net without stages: skipped, with the reason
    net = BlockNet()
    res = sweep(net, torch.randn(2, 3, 4, 4), torch.randint(0, 5, (2,)), ks=(2, 8), pools=("max",), modes=("lowres",))
    assert res.settings == ["max2-lowres+mask"]
    assert "larger than the 4x4 feature map" in res.skipped["max8-lowres+mask"]



def test_fit_stages_looks_only_at_the_stages_a_policy_names():
    """resnet18 at 32x32: stages at 32, 16, 8, 4. K=8 fits stage 1 and 3, not stage 4."""
    model = build_model("resnet18")
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    res = compare_gradients(model, x, y, ["avg8+mask+stages=1", "avg8+mask+stages=1,4", "avg8+mask+stages=4"],
                            fit_stages=True)
    # stage 4 is not named: nothing to narrow, nothing to say
    assert res.applied["avg8+mask+stages=1"] == "avg8+mask+stages=1"
    assert "avg8+mask+stages=1" not in res.notes
    # stage 4 named along with stage 1: narrowed to the one that fits, and said so
    assert res.applied["avg8+mask+stages=1,4"] == "avg8+mask+stages=1"
    assert "4x4 feature map entering layer4" in res.notes["avg8+mask+stages=1,4"]
    # only stage 4 named: nothing fits, skipped with the reason
    assert "4x4 feature map entering layer4" in res.skipped["avg8+mask+stages=4"]
    comp = dict(zip(res.layers, res.compressed["avg8+mask+stages=1"]))
    assert comp["layer1.0.conv1"] and not comp["layer3.0.conv1"] and not comp["layer4.0.conv1"]

def test_sweep_settings_names():
    s = sweep_settings()
    assert len(s) == 13  # K=1 once, then 3 K x 2 pools x 2 modes
    assert s[0] == "avg1+mask" and "max4-lowres+mask" in s and "avg8+mask" in s
    assert sweep_settings((2,), ("avg",), ("upsample",), with_mask=False, extra="bn8") == ["avg2+bn8"]


def test_result_rows_and_json(r20_result):
    res = r20_result
    rows = res.to_rows()
    assert len(rows) == len(res.settings) * len(res.layers)
    assert set(METRICS) <= set(rows[0]) and {"setting", "layer", "applied", "compressed"} <= set(rows[0])
    text = json.dumps(res.to_dict())
    back = FidelityResult.from_dict(json.loads(text))
    assert back.mean("cosine") == pytest.approx(res.mean("cosine"))
    assert len(res.table("rel_error")) == len(res.layers)
    with pytest.raises(ValueError):
        res.table("nope")


def test_fidelity_over_training():
    records = [
        {"type": "step", "step": 10, "loss": 1.0},
        {"type": "fidelity", "step": 20, "epoch": 0, "layers": [{"name": "conv1", "cosine": 0.9, "rel_error": 0.4},
                                                                {"name": "layer1.0.conv1", "cosine": 0.8,
                                                                 "rel_error": 0.6}]},
        {"type": "fidelity", "step": 10, "epoch": 0, "layers": [{"name": "conv1", "cosine": 0.7, "rel_error": 0.7}]},
        {"type": "fidelity", "step": "bad", "layers": []},
        "not a dict",
    ]
    h = fidelity_over_training(records)
    assert h.steps == [10, 20] and h.layers == ["conv1", "layer1.0.conv1"]
    assert h.cosine["conv1"] == [0.7, 0.9] and h.cosine["layer1.0.conv1"] == [None, 0.8]
    assert h.mean("cosine") == pytest.approx([0.7, 0.85])
    assert len(h.to_rows()) == 4
    json.dumps(h.to_dict())
    assert len(fidelity_over_training([])) == 0


def _cli(argv):
    from core.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def test_cli_random_init_json_and_table(tmp_path):
    rc, out, err = _cli(["fidelity", "--model", "resnet20", "--dataset", "noise", "--batch", "4",
                         "--policies", "avg2+mask", "max2", "--json", "--csv", str(tmp_path / "f.csv")])
    assert rc == 0, err
    d = json.loads(out)
    assert d["settings"] == ["avg2+mask", "max2"] and len(d["layers"]) == 19
    assert (tmp_path / "f.csv").read_text().count("\n") == 1 + 2 * 19
    rc, out, err = _cli(["fidelity", "--model", "resnet20", "--dataset", "noise", "--batch", "4",
                         "--policies", "avg4-lowres+mask", "--metric", "projection"])
    assert rc == 0, err
    assert "layer3.2.conv2" in out and "mean cosine" in out and "input-grad rel err" in out
    rc, out, err = _cli(["fidelity", "--model", "resnet20", "--dataset", "noise", "--policies", "avg3"])
    assert rc == 2 and "avg3" in err


def test_cli_with_a_run(tmp_path):
    from safetensors.torch import save_file

    from core.cli.fidelity import _synthetic_batch
    from core.engine.runs.reader import load_model

    torch.manual_seed(1)  # not the seed-0 model the command builds without --run
    model = build_model("resnet20")
    run = tmp_path / "r20-run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": "resnet20", "dataset": "noise", "policy": "avg2+mask"}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(run / "model.safetensors"))
    rc, out, err = _cli(["fidelity", "--run", str(run), "--batch", "4", "--policies", "avg2+mask", "--json"])
    assert rc == 0, err
    d = json.loads(out)
    assert "trained with avg2+mask" in d["what"] and d["batch"] == 4
    # the figures are those of the run's weights on the command's batch, not of a fresh model
    ref = compare_gradients(load_model(run), *_synthetic_batch(4, 32, 10, 0), ["avg2+mask"])
    assert d["metrics"]["avg2+mask"]["cosine"] == pytest.approx(ref.metrics["avg2+mask"]["cosine"], abs=1e-6)
    rc, out, err = _cli(["fidelity", "--model", "resnet20", "--dataset", "noise", "--batch", "4",
                         "--policies", "avg2+mask", "--json"])
    assert json.loads(out)["metrics"]["avg2+mask"]["cosine"] != pytest.approx(d["metrics"]["avg2+mask"]["cosine"])


# ---------------------------------------------------------------------------------------
# figures
# ---------------------------------------------------------------------------------------

def test_fidelity_figures(r20_result):
    fig = plots.fidelity_heatmap(r20_result)
    assert fig.data[0].type == "heatmap"
    assert list(fig.data[0].x) == r20_result.settings and len(fig.data[0].y) == 19
    fig = plots.fidelity_heatmap(r20_result.to_dict(), metric="projection")
    assert fig.data[0].zmid == 1
    fig = plots.fidelity_bars(r20_result, "avg2", metrics=("cosine", "rel_error", "projection"))
    assert [t.type for t in fig.data] == ["bar"] * 3 and len(fig.data[0].x) == 19
    with pytest.raises(KeyError):
        plots.fidelity_bars(r20_result, "avg8")
    h = fidelity_over_training([{"type": "fidelity", "step": s, "epoch": 0,
                                 "layers": [{"name": n, "cosine": 0.9, "rel_error": 0.3} for n in ("a", "b")]}
                                for s in (10, 20, 30)])
    fig = plots.fidelity_over_training_figure(h)
    assert [t.name for t in fig.data] == ["a", "b", "mean"]
    fig = plots.fidelity_over_training_figure({"run-1": h, "run-2": h.to_dict()}, metric="rel_error")
    assert [t.name for t in fig.data] == ["run-1", "run-2"] and list(fig.data[0].y) == pytest.approx([0.3] * 3)
