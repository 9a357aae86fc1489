"""The optimiser step inside the backward (core/engine/step_in_backward.py): the same update as a
plain step, to the bit; fewer bytes at the step peak; nothing updated outside a training step."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_train import TINY, summary, tiny_config
from torch import nn

from core.analysis.planner import plan_memory, training_peak
from core.cli import main
from core.engine.checks import check_config
from core.engine.config import TrainConfig
from core.engine.step_in_backward import StepInBackward, refusal
from core.engine.trainer import resume, train
from core.method.convert import compress_model
from core.method.meter import cpu_step_peak_bytes, model_state_bytes
from core.models.resnet import build_model


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_a_run_stepping_in_the_backward_trains_the_same_weights_to_the_bit(tmp_path, optimizer):
    # fidelity probes every 2 steps run their own gradient passes between the steps
    kw = dict(epochs=1, deterministic=True, fidelity_every=2, optimizer=optimizer)
    plain = train(tiny_config(tmp_path / "plain", **kw))
    fused = train(tiny_config(tmp_path / "fused", step_in_backward=True, **kw))
    assert plain.status == fused.status == "finished"
    for name in ("model.safetensors", "resume.safetensors"):  # weights, and the optimiser's state
        a, b = load_file(str(tmp_path / "plain" / name)), load_file(str(tmp_path / "fused" / name))
        assert a.keys() == b.keys()
        assert [k for k in a if not torch.equal(a[k], b[k])] == []
    # one gradient at a time: the model state counts the largest, not all of them
    params = list(build_model("resnet20", 10).parameters())
    sizes = [p.numel() * 4 for p in params]
    plain_state, fused_state = summary(tmp_path / "plain")["model_state_bytes"], summary(tmp_path / "fused")[
        "model_state_bytes"]
    assert plain_state - fused_state == sum(sizes) - max(sizes)


def _update(loss, opt, hooks: StepInBackward | None) -> None:
    """A plain step (backward, then the optimiser), or one inside the backward."""
    if hooks is None:
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    else:
        with hooks.armed():
            loss.backward()


@pytest.mark.parametrize("policy", ["ckpt", "q4+mask+bn4", "avg2+mask+bn8"])
def test_every_policy_steps_once_per_parameter_to_the_same_weights(policy):
    # checkpointing recomputes blocks inside the backward; the codes draw random dither
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    weights = {}
    for fused in (False, True):
        torch.manual_seed(0)
        model = compress_model(build_model("resnet20", 10), policy)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
        hooks = StepInBackward(model, opt) if fused else None
        torch.manual_seed(1)
        for _ in range(2):
            _update(nn.functional.cross_entropy(model(x), y), opt, hooks)
        weights[fused] = [p.detach().clone() for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(weights[False], weights[True]))


def _linear_stack(n=4, width=512):
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(n)])


def test_gradients_never_coexist_so_the_step_peak_falls_by_all_but_one():
    # four 1 MiB weights, a batch of 2: the parameter gradients are nearly all of a step's bytes
    x, mib = torch.randn(2, 512), 2 ** 20
    peaks = {}
    for fused in (False, True):
        model = _linear_stack()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        hooks = StepInBackward(model, opt) if fused else None

        def step(model=model, opt=opt, hooks=hooks):
            _update(model(x).square().mean(), opt, hooks)

        step()  # momentum buffers exist from here on, as in a steady state
        peaks[fused] = cpu_step_peak_bytes(step)["step_peak_bytes"]
    assert peaks[False] >= 4 * mib  # all four gradients at once
    assert peaks[True] < 2.1 * mib  # one gradient (and SGD's one temporary) at a time
    assert peaks[False] - peaks[True] >= 2 * mib


def test_outside_a_training_step_a_backward_updates_nothing_and_keeps_its_gradients():
    model = _linear_stack(2, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hooks = StepInBackward(model, opt)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(3, 8)).sum().backward()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(p.grad is not None for p in model.parameters())
    with hooks.armed():  # stray gradients are cleared, not added to the step's
        model(torch.randn(3, 8)).sum().backward()
    assert all(p.grad is None for p in model.parameters())
    assert not any(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    hooks.remove()
    model(torch.randn(3, 8)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_what_cannot_step_in_the_backward_is_refused_by_name(tmp_path, capsys):
    assert refusal(False, 1) is None
    assert "fp16 loss scaling" in refusal(True, 1) and "bf16" in refusal(True, 1)
    assert "several GPUs" in refusal(False, 2)
    # fp16 asked for: refused before anything runs (the app's check, the CLI), nothing written
    assert check_config(TrainConfig(step_in_backward=True, amp_dtype="fp16")) == [refusal(True, 1)]
    assert check_config(TrainConfig(step_in_backward=True, amp_dtype="fp16", amp=False)) == []
    out = tmp_path / "run"
    assert main(["train", *TINY, "--step-in-backward", "--amp-dtype", "fp16", "--out", str(out)]) == 2
    assert "fp16 loss scaling" in capsys.readouterr().err and not out.exists()


def test_the_switch_may_change_when_a_run_is_resumed(tmp_path):
    kw = dict(epochs=2, deterministic=True, fidelity_every=0)
    straight = train(tiny_config(tmp_path / "a", **kw))

    def stop_after_first_epoch(trainer, rec):
        if rec["epoch"] == 1:
            trainer.request_stop("test")

    first = train(tiny_config(tmp_path / "b", **kw), callbacks={"on_epoch": [stop_after_first_epoch]})
    assert straight.status == "finished" and first.status == "stopped"
    before = json.loads((tmp_path / "b" / "config.json").read_text())
    second = resume(tmp_path / "b", overrides={"step_in_backward": True})
    assert second.status == "finished"
    # config.json says what the run went on with, and what it had before
    after = json.loads((tmp_path / "b" / "config.json").read_text())
    assert before["step_in_backward"] is False and after["step_in_backward"] is True
    [was] = [r["was"] for r in after["resumes"]]
    assert was == {"step_in_backward": False, "memory": before["memory"]} and after["resumes"][0]["epoch"] == 1
    # the model state now counts one gradient at a time
    assert after["memory"]["model_state_bytes"]["grads"] < before["memory"]["model_state_bytes"]["grads"]
    assert {k: v for k, v in after.items() if k not in ("step_in_backward", "resumes", "memory")} == \
        {k: v for k, v in before.items() if k not in ("step_in_backward", "memory")}
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_cli_train_and_bench_take_the_switch(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--policy", "avg2+mask", "--steps", "2", "--epochs", "1", "--step-in-backward",
                 "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["step_in_backward"] is True
    capsys.readouterr()
    rows = {}
    for flag in ([], ["--step-in-backward"]):
        assert main(["bench", "memory", "--model", "resnet20", "--batch", "8", "--policies", "none", "avg2+mask",
                     "--threads", "1", "--json", *flag]) == 0
        rows[bool(flag)] = json.loads(capsys.readouterr().out)["rows"]
    model = build_model("resnet20", 10)
    grads = model_state_bytes(model)["grads"]
    largest = max(p.numel() * 4 for p in model.parameters())
    for plain, fused in zip(rows[False], rows[True]):
        assert plain["saved_bytes"] == fused["saved_bytes"]
        assert plain["state_bytes"] - fused["state_bytes"] == grads - largest
    # speed: each policy's step in the backward timed against its own plain step, interleaved
    assert main(["bench", "speed", "--model", "resnet20", "--batch", "4", "--repeats", "1", "--no-peak",
                 "--policies", "none", "avg2+mask", "--threads", "1", "--step-in-backward"]) == 0
    table = capsys.readouterr().out
    assert "vs plain step" in table and "optimiser step inside the backward" in table
    assert [line.split()[0] for line in table.splitlines()[3:5]] == ["none", "avg2+mask"]


def test_the_planner_plans_for_the_step_in_the_backward_and_leaves_no_hooks_behind():
    plain = plan_memory("resnet20", "avg2+mask", fit_batches=(2, 4))
    fused = plan_memory("resnet20", "avg2+mask", fit_batches=(2, 4), step_in_backward=True)
    model = compress_model(build_model("resnet20", 10), "avg2+mask")
    sizes = [p.numel() * 4 for p in model.parameters()]
    assert plain.model_state["grads"] == sum(sizes) and fused.model_state["grads"] == max(sizes)
    assert fused.step_in_backward and fused.saved_fit == plain.saved_fit
    state = model_state_bytes(model, "sgd", step_in_backward=True)
    peak = training_peak(model, 16, 32, 10, "sgd", "cpu", step_in_backward=True)
    assert fused.predict(16) == pytest.approx(state["params"] + state["optimizer"] + peak, rel=0.1)
    # training_peak put the weights back and took its hooks off: a backward now updates nothing
    before = [p.detach().clone() for p in model.parameters()]
    nn.functional.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 1])).backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
