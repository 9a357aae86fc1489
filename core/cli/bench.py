"""`python -m core bench {memory,speed,passes}`: policies side by side, measured in one run, or the
fast path's passes against their reference (tables or JSON)."""

from __future__ import annotations

import json

import torch

from ..analysis.bench import DEFAULT_POLICIES, bench_memory, bench_speed
from ..analysis.pass_bench import bench_passes
from ..engine.environment import pick_device
from ..method import CompressionPolicy
from ..method.meter import format_bytes, largest_makers


def _table(rows, cols):
    widths = [max(len(h), *(len(f(r)) for r in rows)) for h, f in cols]
    lines = ["  ".join(h.ljust(w) for (h, _), w in zip(cols, widths))]
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append("  ".join(f(r).ljust(w) for (_, f), w in zip(cols, widths)))
    return "\n".join(lines)


def _pct(v):
    return "" if v is None else f"{-v:+.1%}" if v else "0.0%"


def format_memory(rows, header) -> str:
    cols = [("policy", lambda r: r["policy"] + ("" if r["exact"] else " *")),
            ("saved activations", lambda r: format_bytes(r["saved_bytes"])),
            ("vs none", lambda r: _pct(r.get("saved_cut"))),
            ("model state", lambda r: format_bytes(r["state_bytes"])),
            ("sum", lambda r: format_bytes(r["total_bytes"])),
            ("vs none ", lambda r: _pct(r.get("total_cut")))]
    peak_key = "cuda_peak_bytes" if any("cuda_peak_bytes" in r for r in rows) else "cpu_step_peak_bytes"
    if any(peak_key in r for r in rows):
        label = "CUDA max_memory_allocated" if peak_key.startswith("cuda") else "CPU step peak (profiler)"
        cols += [(label, lambda r: format_bytes(r[peak_key])),
                 ("vs none  ", lambda r: _pct(r.get(peak_key.replace("_bytes", "_cut")))),
                 ("transients", lambda r: format_bytes(r["transient_bytes"]))]
    kinds = ("conv input", "BN input", "ReLU state", "checkpoint input")
    cols += [(k, lambda r, k=k: format_bytes(r["by_kind"].get(k, 0))) for k in kinds]
    return (f"{header}\n" + _table(rows, cols) +
            "\n* = approximate weight gradients (pooled, quantised or residual inputs, or low-precision BN);"
            " unmarked rows are exact."
            "\nsaved activations: distinct bytes autograd keeps for backward in one forward pass (meter);"
            "\nmodel state: parameters + gradients (one at a time with the step in the backward) + SGD momentum;"
            " transients: step peak - saved activations.")


def format_where(rows, share: float = 0.01, most: int = 8) -> str:
    """Per policy, what was alive at its CPU step peak: the makers holding at least `share` of it
    (at most `most` of them), the rest summed."""
    out = []
    for r in rows:
        if "at_peak" not in r:
            continue
        peak = r["cpu_step_peak_bytes"]
        out.append(f"\nat the step peak of {r['policy']} ({format_bytes(peak)} above the step's start; "
                   f"saved activations {format_bytes(r['saved_bytes'])}), alive, by the op that made it:")
        for g in largest_makers(r["at_peak"], most, share, peak):
            out.append(f"  {format_bytes(g['bytes']):>10}  {g['tensors']:>3} x  {g['made_by']}")
    return "\n".join(out)


def format_speed(rows, header) -> str:
    cols = [("policy", lambda r: r["policy"]), ("step time", lambda r: f"{r['step_s'] * 1000:.0f} ms"),
            ("ratio to none", lambda r: f"{r['ratio']:.2f}"), ("images/s", lambda r: f"{r['images_per_s']:.0f}"),
            ("spread", lambda r: f"{r['spread']:.0%}")]
    if all("peak_bytes" in r for r in rows):
        cols += [("step peak", lambda r: format_bytes(r["peak_bytes"])),
                 ("transients", lambda r: format_bytes(r["transient_bytes"]))]
    note = "\nmedian of interleaved repeats; spread = (max-min)/median; transients = step peak - saved activations."
    if all("cpu_ratio" in r for r in rows):
        cols += [("CPU time", lambda r: f"{r['cpu_step_s'] * 1000:.0f} ms"),
                 ("CPU-time ratio", lambda r: f"{r['cpu_ratio']:.2f}")]
        note += "\nCPU time = this process's CPU seconds per step (robust on a shared machine)."
    if all("vs_plain" in r for r in rows):
        key = "cpu_vs_plain" if all("cpu_vs_plain" in r for r in rows) else "vs_plain"
        cols += [("vs plain step", lambda r: f"{r[key]:.2f}")]
        note += ("\nvs plain step = the step in the backward against a plain step of the same policy, "
                 f"interleaved ({'CPU' if key == 'cpu_vs_plain' else 'wall'} time).")
    return f"{header}\n" + _table(rows, cols) + note


def format_passes(rows, header) -> str:
    cols = [("pass", lambda r: r["pass"]), ("fast path", lambda r: r["fast"]),
            ("reference", lambda r: f"{r['ref_ms']:.2f} ms"), ("fast", lambda r: f"{r['fast_ms']:.2f} ms"),
            ("speed-up", lambda r: f"{r['speedup']:.2f}x"),
            ("peak, reference", lambda r: format_bytes(r["ref_peak_bytes"])),
            ("peak, fast", lambda r: format_bytes(r["fast_peak_bytes"])),
            ("agreement", lambda r: "same bits" if r["same_bits"] else f"{r['max_rel_diff']:.1e} of max")]
    return (f"{header}\n" + _table(rows, cols) +
            "\nmedian of interleaved repeats; peak = the most memory one call held above what existed before "
            "(its outputs included); agreement: the same bits, dtype and layout as the reference, or the largest "
            "difference relative to the reference's largest value.")


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="memory and speed of policies side by side, or of the fast path's passes")
    p.add_argument("what", choices=["memory", "speed", "passes"],
                   help="passes: each fast-path pass (Triton kernel on CUDA, compiled on the CPU) against its "
                        "PyTorch reference on one activation (--batch, --channels, --size)")
    p.add_argument("--model", default=None, help="default: resnet18 for memory, resnet20 for speed")
    p.add_argument("--stem", default="cifar", choices=["cifar", "imagenet"])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--size", type=int, default=32, help="input height = width")
    p.add_argument("--channels", type=int, default=64, help="passes: the activation's channels")
    p.add_argument("--policies", nargs="+", default=list(DEFAULT_POLICIES))
    p.add_argument("--device", default="auto")
    p.add_argument("--repeats", type=int, default=7, help="speed: timed repeats per policy")
    p.add_argument("--no-peak", action="store_true", help="skip the per-step peak and transients (faster)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--reference", action="store_true",
                   help="PyTorch reference passes only (no compiled or fused kernels), to compare against")
    p.add_argument("--where", action="store_true",
                   help="memory, CPU: what is alive at each policy's step peak, by the op that made it")
    p.add_argument("--step-in-backward", action="store_true",
                   help="the optimiser steps inside the backward, each parameter as its gradient completes "
                        "(train --step-in-backward)")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.batch < 1 or args.size < 8:
        raise ValueError("--batch must be >= 1 and --size >= 8")
    policies = [str(CompressionPolicy.parse(p)) for p in args.policies]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    if args.what == "passes":
        rows = bench_passes(args.batch, args.channels, args.size, device, repeats=args.repeats,
                            reference=args.reference)
        shape = f"{args.batch}x{args.channels}x{args.size}x{args.size}"
        print(json.dumps({"shape": shape, "device": device.type, "torch": torch.__version__, "rows": rows}, indent=1)
              if args.json else format_passes(rows, f"passes: one activation {shape} (channels_last), {device.type}, "
                                                    f"{torch.get_num_threads()} threads, torch {torch.__version__}"))
        return 0
    model = args.model or ("resnet18" if args.what == "memory" else "resnet20")
    # the stem is PoolProp's own ResNets' choice; a torchvision model comes with its own
    title = model if model.startswith("torchvision:") else f"{model} ({args.stem} stem)"
    if args.what == "memory":
        if args.where and args.no_peak:
            raise ValueError("--where needs the step peak: drop --no-peak")
        rows = bench_memory(model, args.batch, args.size, policies, device, args.stem, step_peak=not args.no_peak,
                            reference=args.reference, step_in_backward=args.step_in_backward, where=args.where)
        text = format_memory(rows, f"memory: {title}, batch {args.batch}, "
                                   f"{args.size}x{args.size}, {device.type}") + format_where(rows)
    else:
        rows = bench_speed(model, args.batch, args.size, policies, device, args.stem, repeats=args.repeats,
                           reference=args.reference, peak=not args.no_peak,
                           step_in_backward=args.step_in_backward)
        text = format_speed(rows, f"speed: {title}, batch {args.batch}, {args.size}x{args.size}, "
                                  f"{device.type}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    kernels = "PyTorch reference passes" if args.reference else "fast path where available"
    if args.step_in_backward:
        kernels += "; optimiser step inside the backward"
    print(json.dumps({"model": model, "batch": args.batch, "size": args.size, "device": device.type,
                      "torch": torch.__version__, "kernels": kernels, "rows": rows}, indent=1)
          if args.json else text + f"\nkernels: {kernels}.")
    return 0
