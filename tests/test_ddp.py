"""Several processes: `torchrun --nproc_per_node=2 -m core train ...` (gloo on the CPU).

What equality holds, and why. `--batch-size B` is the global batch: each of the W ranks
trains on rows [r*B/W, (r+1)*B/W) of the same global batch (order and augmentation come from
(seed, epoch) on every rank), DDP averages the gradients, and every rank takes the same
optimiser step. BatchNorm is per rank (no SyncBatchNorm: compress_model's BatchNorm swaps
would be undone by it): in training mode each rank normalises with the statistics of its own
B/W images, so a DDP run is NOT the single-process run of batch B. It is exactly the
single-process run whose step averages the gradients of the W shards, each forwarded on its
own (per-shard BN), with the BN running statistics of shard 0 (DDP broadcasts rank 0's
buffers). The test builds that reference in-process (the real Trainer, its step replaced) and
checks that the DDP run's final weights and buffers match it to float tolerance (gloo sums in
another order), and that the plain batch-B run differs by much more than that tolerance.
Also: only rank 0 wrote the run directory, once; `--resume` of a torchrun run works.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from core.engine.config import TrainConfig
from core.engine.environment import training_subprocess_env
from core.engine.runs.listing import list_runs
from core.engine.runs.reader import read_metrics
from core.engine.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
DS = "features10:train=64,val=16"
WORLD = 2
STEPS = 3

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")


def config(out, **kw) -> TrainConfig:
    base = dict(model="resnet20", dataset=DS, policy="avg2+mask", epochs=2, steps=STEPS, batch_size=16,
                eval_batch_size=16, log_every=1, fidelity_every=2, deterministic=True, num_threads=1,
                device="cpu", progress=False, out=str(out))
    base.update(kw)
    return TrainConfig(**base)


def torchrun(*args: str) -> subprocess.CompletedProcess:
    env = training_subprocess_env()
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
           "-m", "core", "train", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def split_step(trainer: Trainer):
    """The step DDP computes, in one process: mean of the W shards' gradients, per-shard BN,
    running statistics from shard 0 only."""

    def step(x, y):
        m = trainer.model
        trainer.opt.zero_grad(set_to_none=True)
        b = x.shape[0] // WORLD
        total, right, kept = 0.0, 0, None
        for r in range(WORLD):
            out = m(x[r * b:(r + 1) * b])
            loss = trainer.criterion(out, y[r * b:(r + 1) * b])
            (loss / WORLD).backward()
            total += loss.detach() / WORLD
            right += (out.argmax(1) == y[r * b:(r + 1) * b]).sum()
            if r == 0:
                kept = [t.detach().clone() for t in m.buffers()]
        with torch.no_grad():
            for t, v in zip(m.buffers(), kept):
                t.copy_(v)
        trainer.opt.step()
        return total, right

    return step


def flags(cfg: TrainConfig) -> list[str]:
    """`python -m core train` flags for the settings of `cfg` that differ from the defaults."""
    out, defaults = [], TrainConfig()
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if v is None or v == getattr(defaults, f.name):
            continue
        flag = "--" + f.name.replace("_", "-")
        out += [flag if v else "--no-" + f.name.replace("_", "-")] if isinstance(v, bool) else [flag, str(v)]
    return out


def run_in_process(out, step_fn=None) -> dict:
    t = Trainer(config(out))
    t.setup()
    if step_fn is not None:
        t.train_step = step_fn(t)
    assert t.run().status == "finished"
    return load_file(str(Path(out) / "model.safetensors"))


def test_torchrun_two_processes_equals_the_shard_averaged_reference(tmp_path):
    out = tmp_path / "ddp"
    p = torchrun(*flags(config(out)))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    assert p.stdout.count("finished:") == 1, p.stdout  # rank 0 speaks for all

    cfg = json.loads((out / "config.json").read_text())
    s = json.loads((out / "summary.json").read_text())
    assert cfg["world_size"] == WORLD and cfg["batch_size"] == 16 and cfg["memory"]["measured_batch"] == 16 // WORLD
    assert s["status"] == "finished" and s["steps"] == STEPS and s["world_size"] == WORLD
    log = read_metrics(out)
    steps = [r["step"] for r in log.steps]
    assert steps == list(range(1, STEPS + 1)), steps  # one writer: no duplicated records
    assert len(log.evals) == 1 and log.fidelity
    assert list_runs([tmp_path], include_default=False)[0].status == "finished"

    ddp = load_file(str(out / "model.safetensors"))
    ref = run_in_process(tmp_path / "ref", split_step)
    plain = run_in_process(tmp_path / "plain")
    assert ddp.keys() == ref.keys()
    for k in ddp:
        torch.testing.assert_close(ddp[k], ref[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    # the plain batch-16 run (BN over all 16 images) is measurably different: per-rank BN matters
    diff = max((ddp[k].float() - plain[k].float()).abs().max().item() for k in ddp if ddp[k].is_floating_point())
    assert diff > 1e-3, diff


def test_torchrun_resume_and_bad_batch(tmp_path):
    out = tmp_path / "ddp"
    p = torchrun(*flags(config(out, steps=None, epochs=1)))
    assert p.returncode == 0, p.stderr[-3000:]
    p = torchrun("--resume", str(out), "--epochs", "2", "--no-progress")
    assert p.returncode == 0, p.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["status"] == "finished" and s["epochs_done"] == 2
    assert [r["epoch"] for r in read_metrics(out).evals] == [1, 2]

    p = torchrun(*flags(config(tmp_path / "odd", batch_size=15)))
    assert p.returncode != 0 and "multiple" in p.stderr
    assert not (tmp_path / "odd").exists()
