"""Pooling a conv's input and rebuilding it: the paper's compression, and its low-resolution
weight gradient (exact for inputs constant over each K x K block).

Pooling and upsampling are fast-path passes (core.method.fastpath): compiled on the CPU,
inductor's loops beat ATen's channels_last pooling (about 1.7x at ResNet-20's first stage) and
give the same bits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .fastpath import fused
from .weight_grad import tap_factors, tapwise_pays, zeros_with_strides


@fused
def pool(x: torch.Tensor, pool: str, k: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, ceil(H/k), ceil(W/k)); partial edge blocks pool what they hold."""
    if pool == "avg":
        return F.avg_pool2d(x, k, k, ceil_mode=True, count_include_pad=False)
    return F.max_pool2d(x, k, k, ceil_mode=True)


def pooled_copy(x: torch.Tensor, pool_kind: str, k: int) -> torch.Tensor:
    """P_k(x), computed once per tensor: the copy is attached to x with x's version counter, so
    two convs reading one tensor (a ResNet block's first conv and its downsample shortcut) keep
    one copy, not two; a tensor changed in place since is pooled again."""
    stash = getattr(x, "pp_pooled", None)
    if stash is not None and stash[:3] == (pool_kind, k, x._version):
        return stash[3]
    xp = pool(x, pool_kind, k)
    x.pp_pooled = (pool_kind, k, x._version, xp)
    return xp


@fused
def upsample(xp: torch.Tensor, k: int, size: tuple[int, int]) -> torch.Tensor:
    """Piecewise-constant reconstruction of the pooled copy, cropped to the original size."""
    x = F.interpolate(xp, scale_factor=k, mode="nearest")  # one kernel, keeps channels_last
    return x[:, :, : size[0], : size[1]]


def _weight_grad_from_blocks(xp, g, weight_shape, span_y, span_x, stride, groups, ay, ax, strides, one_hot=False):
    """A weight gradient made of block correlations. c[o, c, dy, dx] = sum over samples and
    positions P of g[P] * xp[stride*P + lo + d], for block offsets d in [lo, hi] per axis (zero
    outside xp: xp is padded or cropped so that a dense correlation at `stride` has g's size);
    weight tap (i, j) is the sum over (y, x) of ay[i, y] * ax[j, x] * c[:, :, y, x]. Returned
    with `strides` (the weight's, so that autograd keeps it as the .grad as it is; None: any).
    `one_hot`: every tap reads one offset (blockwise), so the taps are a gather of c, exact."""
    (lo_y, hi_y), (lo_x, hi_x) = span_y, span_x
    hg, wg = g.shape[2:]
    need_h = stride[0] * (hg - 1) + (hi_y - lo_y) + 1
    need_w = stride[1] * (wg - 1) + (hi_x - lo_x) + 1
    xpad = F.pad(xp, (-lo_x, need_w - xp.shape[3] + lo_x, -lo_y, need_h - xp.shape[2] + lo_y))
    kernel = (weight_shape[0], weight_shape[1], hi_y - lo_y + 1, hi_x - lo_x + 1)
    if tapwise_pays(kernel, g.device, xpad.shape, stride, groups):
        # A weight larger than the input (ResNet-18's last stage): one offset's correlation at
        # a time, added into the taps that read it. convolution_backward and the sum below
        # hold a kernel-shaped weight to read the shape from, its reorder, the correlation,
        # its reorder back and the sum: five weights, where this holds one.
        out = zeros_with_strides(g, weight_shape, strides)
        for y, x, gs, xs in tap_factors(g, xpad, kernel[2:], stride, (0, 0), (1, 1)):
            readers = [(i, j) for i in ay[:, y].nonzero().flatten().tolist()
                       for j in ax[:, x].nonzero().flatten().tolist()]
            if readers:
                c = gs @ xs
                for i, j in readers:
                    out[:, :, i, j].add_(c, alpha=float(ay[i, y] * ax[j, x]))
                del c
            del gs, xs  # before tap_factors copies the next offset's
        return out
    c = torch.ops.aten.convolution_backward(
        g, xpad, g.new_empty(kernel), None, list(stride), [0, 0], [1, 1], False, [0, 0], groups,
        [False, True, False])[1]
    if one_hot:
        grad = c.index_select(2, ay.argmax(1).to(c.device)).index_select(3, ax.argmax(1).to(c.device))
    else:
        grad = torch.einsum("iy,jx,ocyx->ocij", ay.to(c), ax.to(c), c)
    del c  # before the copy below
    if strides is None or grad.stride() == tuple(strides):
        return grad
    return g.new_empty_strided(weight_shape, strides).copy_(grad)  # autograd would copy it anyway


def blockwise_applies(in_hw, stride, k: int) -> bool:
    """Whether `blockwise_weight_grad` gives the upsample-mode weight gradient: strides that are
    multiples of k over sizes divisible by k (no cropped edge blocks)."""
    return all(s % k == 0 and n % k == 0 for s, n in zip(stride, in_hw))


def blockwise_weight_grad(xp, g, weight_shape, stride, padding, dilation, groups, k, strides=None):
    """The weight gradient of a conv reading up_k(xp), without building the full-size copy.

    Output p reads input u = stride*p + t*dilation - padding, whose block is
    (stride/k)*p + floor((t*dilation - padding)/k) when k divides the stride: every tap reads
    one block offset, so one correlation of g with xp at stride/k over the few offsets the taps
    fall on gives all taps (a 3x3 stride-2 conv at k=2: 2x2 offsets, 4/9 of the products).
    Exact: the same sums as from the upsampled copy, in another order. `strides`: the result's
    (the weight's own; default contiguous).
    """
    offsets = [[(t * dilation[a] - padding[a]) // k for t in range(weight_shape[2 + a])] for a in range(2)]
    (lo_y, hi_y), (lo_x, hi_x) = [(min(o), max(o)) for o in offsets]
    ay, ax = [F.one_hot(torch.tensor(o) - min(o), max(o) - min(o) + 1).float() for o in offsets]
    return _weight_grad_from_blocks(xp, g, weight_shape, (lo_y, hi_y), (lo_x, hi_x), [s // k for s in stride],
                                    groups, ay, ax, strides, one_hot=True)


def _lowres_taps(k: int, stride: int, offsets: list[int]):
    """For each tap offset t, how the k output positions of a block split over input blocks.

    Output p = kP + r (r < k) reads input u = stride*p + t, whose block is
    stride*P + floor((stride*r + t) / k). A[t, d] counts the r landing on block offset d,
    so for block-constant input and output gradient: dW[t] = sum_d A[t, d] * C[d] with
    C[d] = sum_P G[P] X[stride*P + d] -- exact, for every tap, not just the centre one.
    """
    reached = [(stride * r + t) // k for t in offsets for r in range(k)]
    lo, hi = min(reached), max(reached)
    a = torch.zeros(len(offsets), hi - lo + 1)  # a column for every offset in [lo, hi], read or not
    for i, t in enumerate(offsets):
        for r in range(k):
            a[i, (stride * r + t) // k - lo] += 1
    return a, lo, hi


def lowres_weight_grad(xp, g, weight_shape, stride, padding, dilation, groups, k, strides=None):
    gp = F.avg_pool2d(g, k, k, ceil_mode=True, count_include_pad=False)  # (B, O, Hg, Wg)
    dims = []
    for axis in range(2):
        offsets = [i * dilation[axis] - padding[axis] for i in range(weight_shape[2 + axis])]
        dims.append(_lowres_taps(k, stride[axis], offsets))
    (ay, lo_y, hi_y), (ax, lo_x, hi_x) = dims
    return _weight_grad_from_blocks(xp, gp, weight_shape, (lo_y, hi_y), (lo_x, hi_x), list(stride), groups, ay, ax,
                                    strides)
