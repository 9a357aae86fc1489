"""Several processes (torchrun): the rank's share of each batch, and what ranks tell each other."""

from __future__ import annotations

import os

import torch


def dist_env() -> tuple[int, int, int]:
    """(world size, rank, local rank) from torchrun's WORLD_SIZE / RANK / LOCAL_RANK; (1, 0, 0) alone."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise ValueError("WORLD_SIZE, RANK and LOCAL_RANK must be integers (set by torchrun)") from None
    return max(world, 1), rank, local


class ShardLoader:
    """Rank r's share of every global batch of a BatchLoader: rows [r*b, (r+1)*b) with
    b = batch_size / world. The global loader draws order and augmentation from (seed, epoch)
    on every rank alike, so the union of the shards is exactly the single-process batch."""

    def __init__(self, loader, rank: int, world: int):
        self.loader, self.rank, self.world = loader, rank, world
        self.local_batch = loader.batch_size // world

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        lo, hi = self.rank * self.local_batch, (self.rank + 1) * self.local_batch
        for x, y in self.loader:
            yield x[lo:hi], y[lo:hi]


def broadcast_text(text: str | None, device: torch.device) -> str:
    """Rank 0's string on every rank (a tensor of bytes: no pickle)."""
    import torch.distributed as dist

    data = (text or "").encode("utf-8")
    n = torch.tensor([len(data)], dtype=torch.long, device=device)
    dist.broadcast(n, 0)
    buf = torch.zeros(int(n.item()), dtype=torch.uint8, device=device)
    if dist.get_rank() == 0:
        buf.copy_(torch.tensor(list(data), dtype=torch.uint8))
    dist.broadcast(buf, 0)
    return bytes(buf.cpu().tolist()).decode("utf-8")


STOP_CODES = {None: 0, "time budget": 1}  # anything else: 2 (a signal, a callback, another rank)


def init_distributed(device_name: str, batch_size: int, world: int, local_rank: int) -> tuple[torch.device, bool]:
    """torchrun: one process per device; NCCL on CUDA, gloo on the CPU. -> (this rank's device,
    whether this call created the process group, so its owner destroys it)."""
    import torch.distributed as dist

    from .environment import pick_device

    if batch_size % world:
        raise ValueError(f"--batch-size {batch_size} is the global batch: it must be a multiple "
                         f"of the {world} processes")
    name = device_name
    if name in ("auto", "cuda") and torch.cuda.is_available():
        name = f"cuda:{local_rank}"
    elif name == "auto":
        name = "cpu"
    device = pick_device(name)
    if device.type == "mps":
        raise ValueError("several processes on MPS are not supported; use --device cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        owns = True
    if dist.get_world_size() != world:  # pragma: no cover
        raise ValueError(f"WORLD_SIZE {world} but the process group has {dist.get_world_size()}")
    return device, owns


def agree_on_stop(reason: str | None, wall: float, device: torch.device) -> tuple[str | None, float]:
    """All ranks agree on stopping (and why, as far as the loop cares) and on the wall clock the
    schedule follows (rank 0's may differ): one tiny all-reduce. -> (reason, wall)."""
    import torch.distributed as dist

    code = STOP_CODES.get(reason, 2)
    t = torch.tensor([float(code), wall], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    agreed = int(t[0].item())
    if agreed != code:
        reason = "time budget" if agreed == 1 else "stopped on another rank"
    return reason, float(t[1].item())


def all_sum(values, device: torch.device) -> list[torch.Tensor]:
    """Sums over the ranks."""
    import torch.distributed as dist

    t = torch.stack([v.to(device, torch.float64) for v in values])
    dist.all_reduce(t)
    return list(t.unbind())
