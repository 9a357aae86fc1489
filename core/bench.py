"""`python -m core bench {memory,speed}`: policies side by side, measured in one run.

memory: saved-activation bytes (the meter), model-state bytes, their sum and the cut
        against `none`; on CUDA also `max_memory_allocated` of a full training step,
        on the CPU the step's peak of live tensor bytes from the profiler.
speed:  training-step time as a ratio to `none`, from interleaved repeats (median), so
        that a noisy machine slows every policy alike.
Gradient checkpointing (`ckpt`) is the exact reference row a user would otherwise pick.
"""

from __future__ import annotations

import json
import statistics
import time

import torch
from torch import nn

from .compression import CompressionPolicy, compress_model
from .memory import (
    cpu_step_peak_bytes,
    cuda_step_peak_bytes,
    format_bytes,
    model_state_bytes,
    saved_activation_bytes,
    training_step_fn,
)
from .models import build_model

DEFAULT_POLICIES = ("none", "avg2", "mask", "avg2+mask", "avg4+mask", "avg2-lowres+mask", "max2+mask",
                    "avg2+mask+bn16", "avg2+mask+bn8", "avg4+mask+bn8", "ckpt")


def pick_device(name: str = "auto") -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _setup(model_name, policy, batch, size, device, stem, channels_last, seed=0):
    torch.manual_seed(seed)
    model = compress_model(build_model(model_name, 10, stem), policy).to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    return model, x, y


def bench_memory(model_name="resnet18", batch=128, size=32, policies=DEFAULT_POLICIES, device="auto",
                 stem="cifar", optimizer="sgd", channels_last=True, step_peak=True) -> list[dict]:
    device = pick_device(device)
    rows = []
    for text in policies:
        policy = CompressionPolicy.parse(text)
        model, x, y = _setup(model_name, policy, batch, size, device, stem, channels_last)
        report = saved_activation_bytes(model, x, y)
        state = model_state_bytes(model, optimizer)
        row = {"policy": str(policy), "exact": policy.is_exact, "saved_bytes": report.total_bytes,
               "by_kind": report.by_kind, "state_bytes": state["total"],
               "total_bytes": report.total_bytes + state["total"]}
        if step_peak:
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            step = training_step_fn(model, x, y, opt)
            step()  # warm-up: creates the optimiser state, so the peak is a steady-state step's
            if device.type == "cuda":
                row["cuda_peak_bytes"] = cuda_step_peak_bytes(step, device)["peak_bytes"]
            elif device.type == "cpu":
                row["cpu_step_peak_bytes"] = cpu_step_peak_bytes(step)["step_peak_bytes"]
        rows.append(row)
        del model, x, y
    base = next((r for r in rows if r["policy"] == "none"), rows[0])
    for r in rows:
        for key in ("saved_bytes", "total_bytes", "cuda_peak_bytes", "cpu_step_peak_bytes"):
            if key in r and base.get(key):
                r[key.replace("_bytes", "_cut")] = 1 - r[key] / base[key]
    return rows


def bench_speed(model_name="resnet20", batch=128, size=32, policies=DEFAULT_POLICIES, device="auto",
                stem="cifar", repeats=7, warmup=2, channels_last=True, amp=None) -> list[dict]:
    """Median step time per policy; repeats interleave the policies (A B C A B C ...)."""
    device = pick_device(device)
    amp = (device.type == "cuda") if amp is None else amp
    setups = {}
    for text in policies:
        model, x, y = _setup(model_name, CompressionPolicy.parse(text), batch, size, device, stem, channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        setups[str(CompressionPolicy.parse(text))] = (model, x, y, opt)

    def step(model, x, y, opt):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    # Wall time, and on the CPU also this process's CPU time: on a shared machine the latter
    # is far less disturbed by other processes (it does not count time spent waiting for a core).
    times: dict[str, list[float]] = {k: [] for k in setups}
    cpu_times: dict[str, list[float]] = {k: [] for k in setups}
    for r in range(warmup + repeats):
        for name, s in setups.items():
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            step(*s)
            sync()
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
                cpu_times[name].append(time.process_time() - c0)
    base = statistics.median(times.get("none") or next(iter(times.values())))
    cpu_base = statistics.median(cpu_times.get("none") or next(iter(cpu_times.values())))
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        row = {"policy": name, "step_s": med, "ratio": med / base, "images_per_s": batch / med,
               "spread": (max(ts) - min(ts)) / med}
        if device.type == "cpu":
            cpu_med = statistics.median(cpu_times[name])
            row.update(cpu_step_s=cpu_med, cpu_ratio=cpu_med / cpu_base)
        rows.append(row)
    return rows


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
                 ("vs none  ", lambda r: _pct(r.get(peak_key.replace("_bytes", "_cut"))))]
    kinds = ("conv input", "BN input", "ReLU state", "checkpoint input")
    cols += [(k, lambda r, k=k: format_bytes(r["by_kind"].get(k, 0))) for k in kinds]
    return (f"{header}\n" + _table(rows, cols) +
            "\n* = approximate weight gradients (pooled inputs or low-precision BN); unmarked rows are exact."
            "\nsaved activations: distinct bytes autograd keeps for backward in one forward pass (meter);"
            "\nmodel state: parameters + gradients + SGD momentum.")


def format_speed(rows, header) -> str:
    cols = [("policy", lambda r: r["policy"]), ("step time", lambda r: f"{r['step_s'] * 1000:.0f} ms"),
            ("ratio to none", lambda r: f"{r['ratio']:.2f}"), ("images/s", lambda r: f"{r['images_per_s']:.0f}"),
            ("spread", lambda r: f"{r['spread']:.0%}")]
    note = "\nmedian of interleaved repeats; spread = (max-min)/median."
    if all("cpu_ratio" in r for r in rows):
        cols += [("CPU time", lambda r: f"{r['cpu_step_s'] * 1000:.0f} ms"),
                 ("CPU-time ratio", lambda r: f"{r['cpu_ratio']:.2f}")]
        note += "\nCPU time = this process's CPU seconds per step (robust on a shared machine)."
    return f"{header}\n" + _table(rows, cols) + note


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="memory and speed of policies, side by side")
    p.add_argument("what", choices=["memory", "speed"])
    p.add_argument("--model", default=None, help="default: resnet18 for memory, resnet20 for speed")
    p.add_argument("--stem", default="cifar", choices=["cifar", "imagenet"])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--size", type=int, default=32, help="input height = width")
    p.add_argument("--policies", nargs="+", default=list(DEFAULT_POLICIES))
    p.add_argument("--device", default="auto")
    p.add_argument("--repeats", type=int, default=7, help="speed: timed repeats per policy")
    p.add_argument("--no-peak", action="store_true", help="memory: skip the per-step peak (faster)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.batch < 1 or args.size < 8:
        raise ValueError("--batch must be >= 1 and --size >= 8")
    policies = [str(CompressionPolicy.parse(p)) for p in args.policies]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    if args.what == "memory":
        model = args.model or "resnet18"
        rows = bench_memory(model, args.batch, args.size, policies, device, args.stem, step_peak=not args.no_peak)
        text = format_memory(rows, f"memory: {model} ({args.stem} stem), batch {args.batch}, "
                                   f"{args.size}x{args.size}, {device.type}")
    else:
        model = args.model or "resnet20"
        rows = bench_speed(model, args.batch, args.size, policies, device, args.stem, repeats=args.repeats)
        text = format_speed(rows, f"speed: {model} ({args.stem} stem), batch {args.batch}, {args.size}x{args.size}, "
                                  f"{device.type}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(json.dumps({"model": model, "batch": args.batch, "size": args.size, "device": device.type,
                      "torch": torch.__version__, "rows": rows}, indent=1) if args.json else text)
    return 0
