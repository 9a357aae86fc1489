"""The saved-activation meter against sizes computed by hand, and the CPU step peak against it."""

import functools
import json

import torch
from torch import nn

from core.analysis.synthetic import training_step
from core.cli import main
from core.method.convert import compress_model
from core.method.meter import SavedActivationMeter, cpu_step_peak_bytes, saved_activation_bytes
from core.models.resnet import build_model


def test_meter_counts_exactly_what_a_conv_bn_relu_keeps():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
    x = torch.randn(4, 3, 16, 16, requires_grad=False)
    act = 4 * 8 * 16 * 16 * 4  # one fp32 activation of the conv's output shape
    rep = saved_activation_bytes(net, x)
    # conv keeps x; BN keeps its input (+ two per-channel stats); ReLU keeps its output
    assert rep.by_kind["conv input"] == x.numel() * 4
    assert rep.by_kind["ReLU state"] == act
    assert act <= rep.by_kind["BN input"] <= act + 2 * 8 * 4
    # mask: 1 bit per element; avg2: the conv input pooled by 2
    rep = saved_activation_bytes(compress_model(net, "avg2+mask"), x)
    assert rep.by_kind["ReLU state"] == act // 32
    assert rep.by_kind["conv input"] == x.numel() * 4 // 4


def test_meter_ignores_parameters_and_dedups_shared_storage():
    lin = nn.Linear(10, 10)
    x = torch.randn(5, 10)
    with SavedActivationMeter(lin) as meter:
        y = lin(x)
        z = y * y  # y saved twice by mul: one storage
    rep = meter.report()
    assert rep.total_bytes == x.numel() * 4 + y.numel() * 4
    del z


def test_meter_leaves_model_as_it_was():
    model = build_model("resnet20")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    saved_activation_bytes(model, torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_pooling_alone_costs_mask_alone_saves_little_together_they_save():
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    total = {p: saved_activation_bytes(compress_model(build_model("resnet20"), p), x, y).total_bytes
             for p in ["none", "avg2", "mask", "avg2+mask", "avg4+mask", "avg2+mask+bn8", "ckpt"]}
    assert total["avg2"] > total["none"]  # the pooled copy is extra: ReLU still keeps the full tensor
    assert total["mask"] > 0.97 * total["none"]  # the conv still keeps the full tensor
    assert total["avg2+mask"] < 0.7 * total["none"]
    assert total["avg4+mask"] < total["avg2+mask"]
    assert total["avg2+mask+bn8"] < 0.45 * total["none"]
    assert total["ckpt"] < 0.4 * total["none"]


def test_cpu_step_peak_is_at_least_the_saved_activations():
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for policy in ["none", "avg2+mask"]:
        model = compress_model(build_model("resnet20"), policy)
        saved = saved_activation_bytes(model, x, y).total_bytes
        step = functools.partial(training_step, model, x, y, None)
        step()
        peak = cpu_step_peak_bytes(step)
        assert saved <= peak["step_peak_bytes"] < 2 * saved + 4e6
        assert abs(peak["net_bytes"]) < 1e6  # everything allocated in the step is freed again


def test_the_step_peak_says_what_was_alive_at_it_and_who_made_it():
    """A step that allocates 1 MiB, then 2 MiB, frees the first, then makes 4 MiB of ones: the
    peak is the last two (6 MiB), made by aten::empty and aten::ones; the first, freed before,
    is not among them. In a backward, the maker names the autograd node."""
    mib = 1 << 20

    def step():
        a = torch.empty(mib // 4)
        b = torch.empty(2 * mib // 4)
        del a
        c = torch.ones(4 * mib // 4)
        del b, c

    peak = cpu_step_peak_bytes(step, where=True)
    assert peak["step_peak_bytes"] == 6 * mib == cpu_step_peak_bytes(step)["step_peak_bytes"]
    assert peak["at_peak"] == [{"made_by": "aten::ones", "tensors": 1, "bytes": 4 * mib},
                               {"made_by": "aten::empty", "tensors": 1, "bytes": 2 * mib}]

    x = torch.randn(mib // 4, requires_grad=True)
    kept = []
    y = x.exp()
    peak = cpu_step_peak_bytes(lambda: kept.append(torch.autograd.grad(y, x, torch.ones_like(y))), where=True)
    makers = {g["made_by"]: g["bytes"] for g in peak["at_peak"]}
    assert makers == {"aten::ones_like": mib, "aten::mul in ExpBackward0": mib}
    assert peak["step_peak_bytes"] == 2 * mib


def test_two_meters_in_two_threads_count_only_their_own_forward():
    """The app runs pages in threads: a checkpointed model measured in one must add nothing to a
    meter open in another, even over one shared model (a cached run two pages look at)."""
    import threading

    torch.manual_seed(0)
    shared = build_model("resnet20", 10).train()
    ckpt = compress_model(build_model("resnet20", 10), "ckpt")
    x = torch.randn(2, 3, 32, 32)
    alone = saved_activation_bytes(shared, x)
    other_done, errors, got = threading.Event(), [], {}

    def other():
        try:
            saved_activation_bytes(ckpt, x)  # its checkpointed blocks announce their inputs
            shared(x).sum()  # and the shared model runs here, under the first meter's hooks
        except Exception as e:  # noqa: BLE001 - handed to the main thread's assert
            errors.append(e)
        other_done.set()

    with SavedActivationMeter(shared) as meter:
        t = threading.Thread(target=other)
        t.start()
        assert other_done.wait(120)
        t.join()
        shared(x).sum()
    got = meter.report()
    assert not errors, errors
    assert got.total_bytes == alone.total_bytes
    assert got.by_kind == alone.by_kind and got.by_layer == alone.by_layer


def test_cli_bench_memory_says_where_the_step_peak_is(capsys):
    """`bench memory --where`: per policy, what was alive at the CPU step peak by the op that made
    it, in the table and in the JSON (at least the peak's bytes: what existed before the step and
    was freed before the peak is in the peak only); refused without the peak."""
    args = ["bench", "memory", "--model", "resnet20", "--batch", "4", "--policies", "none", "avg2+mask",
            "--threads", "1", "--where"]
    assert main([*args, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    for row in rows:
        assert sum(g["bytes"] for g in row["at_peak"]) >= row["cpu_step_peak_bytes"] > 0
        assert all(g["tensors"] >= 1 and g["made_by"] for g in row["at_peak"])
    assert any(g["made_by"].endswith("in CompressedConvFunction") for g in rows[1]["at_peak"])
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "at the step peak of none" in table and "at the step peak of avg2+mask" in table
    assert main([*args, "--no-peak"]) == 2
    assert "--where needs the step peak" in capsys.readouterr().err
