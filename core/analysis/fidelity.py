"""Exact vs compressed weight gradients, layer by layer (docs/fidelity_and_memory.md §1).

For the same weights and the same batch, every conv's weight gradient is computed twice:
exactly (plain autograd) and as training under a compression policy would see it. Four
numbers per layer say how far apart they are:

  cosine            direction: 1 is the same direction
  rel_error         ||g~ - g|| / ||g||: 0 is exact
  sign_agreement    fraction of entries with the same sign (what sign-based optimisers see)
  projection        <g~, g> / ||g||^2: the component of the estimate along the true gradient.
                    < 1 shrinks the step (average pooling smooths the input, so it loses the
                    high-frequency part of x that the gradient correlates with: about 0.74 at
                    K=2 at init), > 1 inflates it (max pooling keeps the block maxima).
  norm_ratio        ||g~|| / ||g|| (= projection / cosine): avg pooling < 1, max pooling > 1
                    (a block's maximum is >= each of its entries; after a ReLU they are >= 0).

And, for the stochastic families (qB, resB, bn4, bn2), over `draws` independent draws of the
estimate:

  bias              ||mean of the draws - g|| / ||g||: how far the estimate is off on average
  bias_floor        the part of `bias` that noise alone explains, sqrt(sum of the entries'
                    variances / draws) / ||g||: an unbiased estimate has bias ~ bias_floor,
                    falling as 1/sqrt(draws); a biased one (pooling: every draw the same) keeps
                    bias = rel_error whatever the draws.

Plus the check the method rests on: the gradient with respect to the input image must be
exact under `upsample` and `lowres` (input gradients need the weights only), as long as
BatchNorm keeps its full input. With `bn16`/`bn8` it is not, and the report says by how much.

Everything runs a train-mode forward (batch statistics), because that is what training sees.
The model is left exactly as it came: BN running statistics, every `.grad`, train/eval mode
and its compression policy.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..method import CompressionPolicy, PolicyError, compress_model, compressed, decompress_model
from ..method.conv import CompressedConv2d
from ..method.gradients import METRICS, compare, gradients, trainable_convs
from ..method.policy import KS, MODES, POOLS
from ..method.probe import conv_input_shapes, pooled_convs, too_small_for_k
from ..method.snapshot import preserved

BIAS_METRICS = ("bias", "bias_floor")
METRIC_LABELS = {
    "cosine": "cosine similarity",
    "rel_error": "relative L2 error",
    "sign_agreement": "sign agreement",
    "projection": "projection ratio <g~,g>/|g|^2",
    "norm_ratio": "norm ratio |g~|/|g|",
    "bias": "bias |mean(g~)-g|/|g|",
    "bias_floor": "bias explained by noise",
}


# ---------------------------------------------------------------------------------------
# Result types
# ---------------------------------------------------------------------------------------

@dataclass
class FidelityResult:
    """Layer x setting tables of gradient fidelity.

    `metrics[setting][metric]` is a list aligned with `layers` (None where a layer has no
    gradient). `compressed[setting]` says per layer whether its conv was actually pooled (a
    setting narrowed to some stages leaves the others exact). `applied[setting]` is the
    policy that ran, which differs from the setting's name when it had to be narrowed.
    """

    layers: list[str]
    settings: list[str]
    metrics: dict[str, dict[str, list[float | None]]]
    input_rel_error: dict[str, float | None]
    applied: dict[str, str] = field(default_factory=dict)
    compressed: dict[str, list[bool]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    layer_shapes: dict[str, list[int]] = field(default_factory=dict)  # conv input (C, H, W)
    batch: int = 0
    seconds: float = 0.0

    def table(self, metric: str = "cosine") -> list[list[float | None]]:
        """rows = layers, columns = settings."""
        _check_metric(metric)
        return [[self.metrics[s][metric][i] for s in self.settings] for i in range(len(self.layers))]

    def mean(self, metric: str = "cosine", compressed_only: bool = False) -> dict[str, float | None]:
        """Mean over layers per setting (optionally only over the layers that were pooled)."""
        _check_metric(metric)
        out = {}
        for s in self.settings:
            if metric not in self.metrics[s]:  # bias metrics: only where draws were made
                out[s] = None
                continue
            vals = [v for i, v in enumerate(self.metrics[s][metric])
                    if v is not None and (not compressed_only or self.compressed.get(s, [True] * len(self.layers))[i])]
            out[s] = sum(vals) / len(vals) if vals else None
        return out

    def layer(self, setting: str) -> list[dict]:
        """One setting as [{"name", "cosine", "rel_error", ...}] in layer order."""
        m = self.metrics[setting]
        comp = self.compressed.get(setting, [True] * len(self.layers))
        keys = [k for k in (*METRICS, *BIAS_METRICS) if k in m]
        return [{"name": n, **{k: m[k][i] for k in keys}, "compressed": comp[i]}
                for i, n in enumerate(self.layers)]

    def to_rows(self) -> list[dict]:
        """Long form, one row per (setting, layer): ready for csv.DictWriter."""
        rows = []
        for s in self.settings:
            for d in self.layer(s):
                rows.append({"setting": s, "applied": self.applied.get(s, s), "layer": d.pop("name"), **d})
        return rows

    def to_dict(self) -> dict:
        return {"layers": self.layers, "settings": self.settings, "metrics": self.metrics,
                "input_rel_error": self.input_rel_error, "applied": self.applied, "compressed": self.compressed,
                "skipped": self.skipped, "notes": self.notes, "layer_shapes": self.layer_shapes,
                "batch": self.batch, "seconds": self.seconds}

    @classmethod
    def from_dict(cls, d: dict) -> FidelityResult:
        return cls(**d)


def _check_metric(metric: str) -> None:
    if metric not in METRICS + BIAS_METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS + BIAS_METRICS)}")


def _loss_fn(loss) -> Callable:
    if callable(loss):
        return loss
    if loss == "ce":
        return F.cross_entropy
    if loss == "sum":
        return lambda out, _y: out.float().sum()
    raise ValueError(f"unknown loss {loss!r}; use 'ce', 'sum' or a callable(out, y)")


def _rel(a, e) -> torch.Tensor:
    a, e = a.detach().double(), e.detach().double()
    return (a - e).norm() / e.norm().clamp_min(1e-300)


def _fit_policy(policy: CompressionPolicy, model, convs, shapes) -> tuple[CompressionPolicy | None, str | None]:
    """Narrow `policy` to the stages (of those it names) where K fits every conv's feature map.

    Returns (policy to run, note) or (None, reason to skip).
    """
    try:
        pooled = pooled_convs(model, policy)
    except PolicyError:  # a stage the model lacks: let the comparison itself say so
        pooled = None
    too_small = too_small_for_k(policy, shapes, pooled)
    if not too_small:
        return policy, None
    h, w = shapes[too_small[0]][1:]
    stages = [s for s in getattr(model, "stage_names", []) if s.startswith("layer")]
    wanted = policy.stages() or {int(s[5:]) for s in stages}
    fits = [int(s[5:]) for s in stages
            if int(s[5:]) in wanted and not any(n.startswith(s + ".") for n in too_small)]
    if not fits:
        return None, f"K={policy.k} is larger than the {h}x{w} feature map entering {too_small[0]}"
    narrowed = dataclasses.replace(policy, scope="stages=" + ",".join(map(str, fits)))
    note = (f"K={policy.k} is larger than the {h}x{w} feature map entering {too_small[0]}; "
            f"applied as {narrowed} (the stem and the other stages keep exact inputs)")
    return narrowed, note


def _pooled_layers(model, convs) -> list[bool]:
    return [isinstance(m, CompressedConv2d) for _, m in convs]


# ---------------------------------------------------------------------------------------
# The analysis
# ---------------------------------------------------------------------------------------

def compare_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      policies: Iterable[str | CompressionPolicy], loss="ce",
                      fit_stages: bool = False, draws: int = 1) -> FidelityResult:
    """Per conv layer, the compressed weight gradient of each policy against the exact one.

    One exact forward+backward, then one per policy (the single-draw metrics: what one
    training step sees). With `draws` > 1 the bias metrics are added, from `draws` draws of
    the stochastic policies (the deterministic ones need one: their bias is their error). A
    policy whose K does not fit a layer raises PolicyError unless `fit_stages=True`, which
    narrows it to the stages it fits (or skips it) and notes that in the result.
    """
    t0 = time.perf_counter()
    loss_fn = _loss_fn(loss)
    policies = [CompressionPolicy.parse(p) for p in policies]
    convs = trainable_convs(model)
    names = [n for n, _ in convs]
    res = FidelityResult(layers=names, settings=[], metrics={}, input_rel_error={}, batch=int(x.shape[0]))
    with preserved(model):
        model.train()
        decompress_model(model)
        shapes = conv_input_shapes(model, x)
        res.layer_shapes = {n: list(s) for n, s in shapes.items()}
        exact_w, exact_x = gradients(model, convs, x, y, loss_fn)
        stats, bias = {}, {}
        for policy in policies:
            name = str(policy)
            if name in res.settings or name in res.skipped:
                continue
            run_policy, note = (_fit_policy(policy, model, convs, shapes) if fit_stages else (policy, None))
            if run_policy is None:
                res.skipped[name] = note
                continue
            if note:
                res.notes[name] = note
            compress_model(model, run_policy)
            try:
                approx_w, approx_x = gradients(model, convs, x, y, loss_fn)
            except PolicyError as e:
                if not fit_stages:
                    raise
                res.skipped[name] = str(e)
                continue
            finally:
                pooled = _pooled_layers(model, convs)
                decompress_model(model)
            res.settings.append(name)
            res.applied[name] = str(run_policy)
            res.compressed[name] = pooled
            stats[name] = ([None if a is None or e is None else compare(a, e) for a, e in zip(approx_w, exact_w)],
                           _rel(approx_x, exact_x) if approx_x is not None and exact_x is not None else None)
            if draws > 1:
                bias[name] = _bias(model, run_policy, convs, x, y, loss_fn, approx_w, exact_w, draws)
    # one device->host transfer for everything
    flat = [t for s in res.settings for t in stats[s][0] if t is not None]
    flat += [stats[s][1].reshape(1) for s in res.settings if stats[s][1] is not None]
    host = torch.cat(flat).cpu().tolist() if flat else []
    pos = 0

    def take(n: int):
        nonlocal pos
        pos += n
        return host[pos - n: pos]

    per_layer = {s: [None if t is None else take(len(METRICS)) for t in stats[s][0]] for s in res.settings}
    for s in res.settings:
        rel_x = stats[s][1]
        res.input_rel_error[s] = None if rel_x is None else _finite(take(1)[0])
        res.metrics[s] = {m: [None if v is None else _finite(v[i]) for v in per_layer[s]]
                          for i, m in enumerate(METRICS)}
        if s in bias:
            res.metrics[s].update({k: [None if v is None else _finite(float(v[j])) for v in bias[s]]
                                   for j, k in enumerate(BIAS_METRICS)})
    res.seconds = time.perf_counter() - t0
    return res


def _bias(model, policy, convs, x, y, loss_fn, first, exact, draws: int) -> list[tuple[float, float] | None]:
    """Per layer (bias, bias_floor) from `draws` draws of the estimate, the first already made."""
    if not policy.quantises:  # deterministic: every draw equals the first
        return [None if a is None or e is None else (_rel(a, e).item(), 0.0) for a, e in zip(first, exact)]
    total = [None if a is None else a.double() for a in first]
    squares = [None if a is None else a.double() ** 2 for a in first]
    with compressed(model, policy):
        for _ in range(draws - 1):
            more, _ = gradients(model, convs, x, y, loss_fn)
            for i, a in enumerate(more):
                if a is not None:
                    total[i] += a.double()
                    squares[i] += a.double() ** 2
    out = []
    for t, q, e in zip(total, squares, exact):
        if t is None or e is None:
            out.append(None)
            continue
        mean = t / draws
        var = ((q - draws * mean ** 2) / (draws - 1)).clamp_min(0)  # per entry, unbiased
        norm = e.double().norm().clamp_min(1e-300)
        out.append((((mean - e.double()).norm() / norm).item(), ((var.sum() / draws).sqrt() / norm).item()))
    return out


def _finite(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def sweep_settings(ks: Sequence[int] = (1, 2, 4, 8), pools: Sequence[str] = ("avg", "max"),
                   modes: Sequence[str] = ("upsample", "lowres"), with_mask: bool = True,
                   extra: str = "") -> list[str]:
    """Policy strings for every (pool, K, mode), K=1 only once (pooling by 1 is the identity)."""
    out: list[str] = []
    for k in ks:
        if k not in KS:
            raise PolicyError(f"K={k} is not supported; use one of {KS}")
        for pool in pools:
            if pool not in POOLS:
                raise PolicyError(f"unknown pooling {pool!r}; use avg or max")
            for mode in modes:
                if mode not in MODES:
                    raise PolicyError(f"unknown mode {mode!r}; use {' or '.join(MODES)}")
                name = f"{pool}{k}" + ("-lowres" if mode == "lowres" else "")
                name += "+mask" if with_mask else ""
                name += f"+{extra}" if extra else ""
                name = str(CompressionPolicy.parse(name))
                if k == 1 and any(s.startswith(("avg1", "max1")) for s in out):
                    continue
                if name not in out:
                    out.append(name)
    return out


def sweep(model: nn.Module, x: torch.Tensor, y: torch.Tensor, ks: Sequence[int] = (1, 2, 4, 8),
          pools: Sequence[str] = ("avg", "max"), modes: Sequence[str] = ("upsample", "lowres"),
          with_mask: bool = True, loss="ce", extra: str = "") -> FidelityResult:
    """Layer x setting table over pooling kind, K and mode (one exact backward shared by all).

    Settings are named by their policy string ("avg2+mask", "max4-lowres+mask"). A K larger
    than some stage's feature map is applied to the stages where it fits (noted in
    `result.notes`; the layers left exact show cosine 1 and `compressed` False); when it fits
    nowhere, or the model has no stages, the setting is skipped with the reason in
    `result.skipped`. `extra` appends policy parts to every setting (e.g. "bn8").
    """
    settings = sweep_settings(ks, pools, modes, with_mask, extra)
    return compare_gradients(model, x, y, settings, loss=loss, fit_stages=True)
