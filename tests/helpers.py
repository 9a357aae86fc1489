"""Builders shared by several test modules (pytest puts tests/ on sys.path)."""
from pathlib import Path

import torch


def block_constant(shape, k, dtype=torch.float64, seed=0):
    """A random tensor constant on k x k blocks (edge blocks cropped when k does not divide)."""
    g = torch.Generator().manual_seed(seed)
    b, c, h, w = shape
    t = torch.randn(b, c, -(-h // k), -(-w // k), dtype=dtype, generator=g)
    return t.repeat_interleave(k, 2).repeat_interleave(k, 3)[:, :, :h, :w].contiguous()


def make_tiny_runs(root: Path) -> Path:
    """Two finished tiny runs (baseline and avg2+mask), 2 epochs of 2 steps on a 64-image
    features10, under root; returns root."""
    from core.engine.config import TrainConfig
    from core.engine.trainer import train

    for policy in ("none", "avg2+mask"):
        cfg = TrainConfig(model="resnet20", dataset="features10:train=64,val=32", policy=policy, epochs=2,
                          batch_size=32, eval_batch_size=32, log_every=1, fidelity_every=1, num_threads=1,
                          device="cpu", progress=False, out=str(root / f"tiny-{policy.replace('+', '_')}"))
        assert train(cfg).status == "finished"
    return root
