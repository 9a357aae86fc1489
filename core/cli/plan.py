"""`python -m core plan`: does a model fit a GPU? The paper's title as a command.

    python -m core plan --model torchvision:efficientnet_b0 --size 224 --batch 128 --gpu 8

For each policy: the predicted peak of a training step at --batch and whether it fits a card
of --gpu GB, then the largest batch that fits cards of 4-24 GB. Measured here, on this
machine's CPU unless --device cuda: the meter's saved bytes, the model state, and the
backward's transients from the CPU step peak, each fitted linearly in the batch (a CUDA card
adds its libraries' workspaces and allocator slack: see docs/fidelity_and_memory.md §4).
"""

from __future__ import annotations

import json

import torch

from ..analysis.planner import GIB, GPU_SIZES_GB, largest_batch, plan_memory
from ..method import CompressionPolicy
from ..method.meter import format_bytes

DEFAULT_POLICIES = ("none", "avg2+mask", "avg2+mask+bn8", "q4+mask+bn4", "q2+mask+bn2", "ckpt")


def _gb(n: float) -> str:
    return f"{n / GIB:.1f} GB"


def run(args) -> int:
    if args.batch < 1 or args.gpu <= 0:
        raise ValueError("--batch must be >= 1 and --gpu a positive size in GB")
    policies = [str(CompressionPolicy.parse(p)) for p in args.policies]
    if args.threads:
        torch.set_num_threads(args.threads)
    fit = args.fit_batches or ((2, 4) if args.size >= 128 else (8, 16, 24, 32))
    plans = [plan_memory(args.model, p, size=args.size, device=args.device, fit_batches=fit,
                         num_classes=args.num_classes, stem=args.stem, step_in_backward=args.step_in_backward)
             for p in policies]
    budget = args.gpu * GIB
    if args.json:
        print(json.dumps([{**p.to_dict(), "batch": args.batch, "predicted_peak": p.predict(args.batch),
                           "fits": p.fits(args.batch, budget),
                           "largest_batch": {gb: largest_batch(p, gb * GIB) for gb in GPU_SIZES_GB}}
                          for p in plans], indent=1, default=str))
        return 0
    article = "an" if f"{args.gpu:g}".startswith(("8", "11", "18")) else "a"  # "an 8 GB", "an 80 GB"
    print(f"{args.model} at {args.size}x{args.size}, batch {args.batch}, on {article} {args.gpu:g} GB card:")
    for p in plans:
        verdict = "yes" if p.fits(args.batch, budget) else "no"
        print(f"  {p.policy:18s} {verdict:3s}  predicted peak {_gb(p.predict(args.batch))}")
    print(f"\nlargest batch per card ({', '.join(f'{g} GB' for g in GPU_SIZES_GB)}):")
    for p in plans:
        print(f"  {p.policy:18s} " + "  ".join(f"{largest_batch(p, g * GIB):>6d}" for g in GPU_SIZES_GB))
    print("\nper image: " + ", ".join(f"{p.policy} {format_bytes(p.bytes_per_image)}" for p in plans))
    print(f"measured: {plans[0].measure}, at batches {', '.join(map(str, fit))} on {plans[0].device}"
          + (", the optimiser stepping inside the backward." if args.step_in_backward else "."))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("plan", help="does a model fit a GPU? the largest batch per policy and card",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet18", help="a PoolProp ResNet or torchvision:NAME")
    p.add_argument("--size", type=int, default=32, help="input height = width (224 for ImageNet models)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--gpu", type=float, default=8, help="card size in GB (GiB)")
    p.add_argument("--policies", nargs="+", default=list(DEFAULT_POLICIES))
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--stem", default="cifar", choices=("cifar", "imagenet"), help="PoolProp ResNet-18/34/50 stem")
    p.add_argument("--fit-batches", type=int, nargs="+", default=None,
                   help="batches measured for the fit (default 2 4 at 224 px, 8 16 24 32 at 32 px)")
    p.add_argument("--device", default="cpu", help="cpu (meter + CPU step peak), or cuda (max_memory_allocated)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--step-in-backward", action="store_true",
                   help="plan for train --step-in-backward (the gradients never all coexist)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)
