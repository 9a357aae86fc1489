"""`python -m core fidelity`: exact vs compressed weight gradients of a run, per layer.

    python -m core fidelity --run RUN [--policies avg2+mask max2+mask ...] [--batch 64] [--json]
    python -m core fidelity --model resnet20 --dataset features10      # random init, no run needed
    python -m core fidelity --run RUN --sweep --ks 1 2 4 --csv out.csv  # pool x K x mode sweep

Imports only torch and core modules (no plotly/captum/streamlit): it runs on the GPU machine.
"""

from __future__ import annotations

import csv
import io
import json

import torch
import torch.nn.functional as F

from ..analysis.fidelity import BIAS_METRICS, METRIC_LABELS, METRICS, FidelityResult, compare_gradients, sweep
from ..engine import atomic
from ..method import CompressionPolicy

DEFAULT_POLICIES = ("avg2+mask", "max2+mask", "avg2-lowres+mask", "avg4+mask", "avg2+mask+bn8",
                    "q4+mask+bn4", "q2+mask+bn2", "avg2+res2+mask")
SYNTHETIC = "noise"  # --dataset noise: smooth random images, for trying the command without data


def _synthetic_batch(n: int, size: int, num_classes: int, seed: int):
    """Spatially smooth random images (bilinear-upsampled noise, unit variance) and labels."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(n, 3, max(size // 4, 1), max(size // 4, 1), generator=g)
    x = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std().clamp_min(1e-6)
    return x, torch.randint(0, num_classes, (n,), generator=g)


def _dataset_batch(name: str, n: int, seed: int, data_dir=None, split_seed: int = 0, mean=None, std=None):
    from ..engine import data as data_mod

    ds = data_mod.load_dataset(name, data_dir=data_dir, split_seed=split_seed)
    xs, ys = ds.val_x, ds.val_y
    if len(ys) == 0:
        raise ValueError(f"dataset {name!r} has an empty validation split")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(ys), generator=g)[: min(n, len(ys))]
    x = data_mod.normalize(xs[idx], mean or ds.mean, std or ds.std)
    return x.float(), torch.as_tensor(ys)[idx].long(), ds


def load_inputs(args):
    """(model, x, y, description) from --run or --model/--dataset."""
    from ..models import build_model

    if args.run:
        from ..engine.runs import load_config, load_model, resolve_run

        path = resolve_run(args.run)
        cfg = load_config(path)
        model = load_model(path)
        dataset = args.dataset or cfg.get("dataset")
        if not dataset:
            raise ValueError(f"{path / 'config.json'} names no dataset; pass --dataset")
        what = f"run {path.name} ({cfg['model']}, trained with {cfg.get('policy', 'none')})"
        num_classes = model.fc.out_features
        size = int(cfg.get("image_size", 32))
        split_seed = int(cfg.get("split_seed", 0))
        mean, std = cfg.get("mean"), cfg.get("std")
        data_dir = args.data_dir or (cfg.get("data_dir") if not args.dataset else None)
    else:
        torch.manual_seed(args.seed)
        model = build_model(args.model, num_classes=args.num_classes, stem=args.stem)
        dataset = args.dataset
        what = f"{args.model} at random init (seed {args.seed})"
        num_classes, size, split_seed, mean, std, data_dir = args.num_classes, args.size, 0, None, None, args.data_dir
    if dataset == SYNTHETIC:
        x, y = _synthetic_batch(args.batch, size, num_classes, args.seed)
        what += ", smooth random images"
    else:
        x, y, ds = _dataset_batch(dataset, args.batch, args.seed, data_dir, split_seed, mean, std)
        if getattr(ds, "num_classes", num_classes) != num_classes:
            raise ValueError(f"{dataset} has {ds.num_classes} classes but the model has {num_classes}")
        what += f", {len(y)} {dataset} validation images"
        if not args.run and args.size != x.shape[-1]:  # e.g. CIFAR's 32 px for a 224 px ImageNet model
            x = F.interpolate(x, size=(args.size, args.size), mode="bilinear", align_corners=False)
            what += f" resized to {args.size} px"
    dev = torch.device(args.device)
    return model.to(dev), x.to(dev), y.to(dev), what


def format_result(res: FidelityResult, metric: str = "cosine") -> str:
    """Per-layer table of one metric (layers x settings), then the mean of every metric per setting."""
    settings = res.settings
    w_name = max([len(n) for n in res.layers] + [len("mean (pooled layers)")])
    w = max([len(s) for s in settings] + [8])
    fmt = lambda v: "-".rjust(w) if v is None else f"{v:{w}.4f}"  # noqa: E731
    lines = [f"{metric} ({METRIC_LABELS[metric]}) per layer; '*' = not pooled in that setting",
             " " * w_name + "  " + "  ".join(s.rjust(w) for s in settings)]
    for i, n in enumerate(res.layers):
        cells = []
        for s in settings:
            cell = fmt(res.metrics[s][metric][i])
            cells.append(cell if res.compressed.get(s, [True] * len(res.layers))[i] else cell[1:] + "*")
        lines.append(n.ljust(w_name) + "  " + "  ".join(cells))
    lines.append("")
    for m in METRICS:
        means = res.mean(m, compressed_only=True)
        lines.append(f"mean {m}".ljust(w_name) + "  " + "  ".join(fmt(means[s]) for s in settings))
    for m in BIAS_METRICS:
        if any(m in res.metrics[s] for s in settings):
            means = res.mean(m, compressed_only=True)
            lines.append(f"mean {m}".ljust(w_name) + "  " + "  ".join(fmt(means[s]) for s in settings))
    lines.append("input-grad rel err".ljust(w_name) + "  " + "  ".join(
        ("-".rjust(w) if res.input_rel_error[s] is None else f"{res.input_rel_error[s]:{w}.1e}") for s in settings))
    lines.append("(means over the compressed layers; the input gradient is exact under full BatchNorm; bias ~ its"
                 " floor: unbiased)")
    for s, note in res.notes.items():
        lines.append(f"note: {s}: {note}")
    for s, why in res.skipped.items():
        lines.append(f"skipped: {s}: {why}")
    lines.append(f"batch {res.batch}, {len(settings)} settings, {res.seconds:.1f} s")
    return "\n".join(lines)


def write_csv(res: FidelityResult, path: str) -> None:
    rows = res.to_rows()
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["setting", "layer"])
    writer.writeheader()
    writer.writerows(rows)
    atomic.write_text(path, buf.getvalue())


def cmd_fidelity(args) -> int:
    if not args.run and not args.model:
        raise ValueError("give --run RUN, or --model NAME (random init) with --dataset")
    if not args.run and not args.dataset:
        raise ValueError(f"--model needs --dataset (features10, cifar10, ... or {SYNTHETIC})")
    if args.batch < 2:
        raise ValueError("--batch must be at least 2 (BatchNorm needs batch statistics)")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, x, y, what = load_inputs(args)
    if args.sweep:
        res = sweep(model, x, y, ks=args.ks, pools=args.pools, modes=args.modes, with_mask=not args.no_mask)
    else:
        policies = args.policies or list(DEFAULT_POLICIES)
        for p in policies:
            CompressionPolicy.parse(p)
        res = compare_gradients(model, x, y, policies, fit_stages=True, draws=args.draws)
    if args.csv:
        write_csv(res, args.csv)
    if args.json:
        print(json.dumps({"what": what, **res.to_dict()}, indent=1))
    else:
        print(what)
        print(format_result(res, args.metric))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "fidelity", help="exact vs compressed weight gradients, per layer",
        description="Compare each conv's exact weight gradient with the one training under a compression "
                    "policy would use (same weights, same batch, train-mode BatchNorm).")
    src = p.add_argument_group("what to analyse")
    src.add_argument("--run", default=None, help="run folder, or a run name in runs/ or checkpoints/")
    src.add_argument("--model", default=None, help="without --run: this model at random init (e.g. resnet20)")
    src.add_argument("--stem", default="cifar", choices=("cifar", "imagenet"))
    src.add_argument("--num-classes", type=int, default=10)
    src.add_argument("--dataset", default=None,
                     help=f"features10 | cifar10 | imagefolder:PATH | {SYNTHETIC} (default: the run's)")
    src.add_argument("--data-dir", default=None)
    src.add_argument("--size", type=int, default=32,
                     help=f"image size for --dataset {SYNTHETIC}; without --run, other datasets are resized to it")
    p.add_argument("--policies", nargs="+", default=None, metavar="POLICY",
                   help=f"settings to compare (default: {' '.join(DEFAULT_POLICIES)})")
    p.add_argument("--sweep", action="store_true", help="sweep pooling x K x mode instead of --policies")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--pools", nargs="+", default=["avg", "max"], choices=("avg", "max"))
    p.add_argument("--modes", nargs="+", default=["upsample", "lowres"], choices=("upsample", "lowres"))
    p.add_argument("--no-mask", action="store_true", help="sweep without the ReLU mask (gradients are the same)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="which images (and the init without --run)")
    p.add_argument("--metric", default="cosine", choices=METRICS + BIAS_METRICS, help="per-layer metric in the table")
    p.add_argument("--draws", type=int, default=8,
                   help="draws of the stochastic policies for the bias rows (1 = no bias rows)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--csv", default=None, metavar="PATH", help="also write one row per (setting, layer)")
    p.set_defaults(func=cmd_fidelity)
