"""A conv's weight gradient one kernel tap at a time, for where the weight outweighs the
activations it is computed from (ResNet-18's last stage at batch 128: 9 MiB of weight, a 4 MiB
input), so that the gradient, not convolution_backward's buffers, sets the step's peak."""

from __future__ import annotations

import math

import torch


def _tap_rows(t: int, size: int, out_size: int, stride: int, padding: int, dilation: int) -> tuple[int, int]:
    """The output rows [lo, hi) whose tap t reads an input row inside [0, size)."""
    lo = max(0, -((dilation * t - padding) // stride))  # ceil((padding - dilation*t) / stride)
    hi = min(out_size, (size - 1 + padding - dilation * t) // stride + 1)
    return lo, max(lo, hi)


def tap_factors(g, x, kernel_hw, stride, padding, dilation):
    """For each kernel tap (ty, tx) that reads inside x (N, C, H, W), yields (ty, tx, gs, xs):
    the output gradient (N, O, Ho, Wo) at the positions whose tap lands inside x, and the input
    values it reads there, as (O, P) and (P, C) matrices. gs @ xs is that tap's weight
    gradient (groups 1). The generator drops its references to a tap's copies before making
    the next tap's: a caller that drops its own keeps one tap's alive at a time."""
    o, c = g.shape[1], x.shape[1]
    h, w = x.shape[2:]
    ho, wo = g.shape[2:]
    gl, xl = g.permute(0, 2, 3, 1), x.permute(0, 2, 3, 1)  # (N, H, W, C): views in channels_last
    for ty in range(kernel_hw[0]):
        y0, y1 = _tap_rows(ty, h, ho, stride[0], padding[0], dilation[0])
        for tx in range(kernel_hw[1]):
            x0, x1 = _tap_rows(tx, w, wo, stride[1], padding[1], dilation[1])
            if y0 == y1 or x0 == x1:
                continue  # the tap reads only padding
            iy = stride[0] * y0 + dilation[0] * ty - padding[0]
            ix = stride[1] * x0 + dilation[1] * tx - padding[1]
            xs = xl[:, iy: iy + stride[0] * (y1 - y0 - 1) + 1: stride[0],
                    ix: ix + stride[1] * (x1 - x0 - 1) + 1: stride[1]].reshape(-1, c)
            gs = gl[:, y0:y1, x0:x1].reshape(-1, o).t()
            yield ty, tx, gs, xs
            del gs, xs  # before the next tap's copies


def zeros_with_strides(like: torch.Tensor, shape, strides=None) -> torch.Tensor:
    """Zeros of `shape` on like's device and dtype, with `strides` (default contiguous)."""
    return like.new_zeros(shape) if strides is None else like.new_empty_strided(shape, strides).zero_()


def tapwise_weight_grad(g, x, weight_shape, stride, padding, dilation, strides=None, into=None) -> torch.Tensor:
    """conv2d's weight gradient (groups 1) one kernel tap at a time (tap_factors).

    Beside the gradient it holds one tap's slices; convolution_backward holds two more
    weight-sized buffers (its own layout and the reorder back). Returns a tensor of
    `weight_shape` with `strides` (default contiguous): give the weight's own, so that autograd
    keeps it as the .grad without a reordered copy. `into`: a gradient to add this one into
    (a batch chunk's after another's), returned.
    """
    out = zeros_with_strides(g, weight_shape, strides) if into is None else into
    for ty, tx, gs, xs in tap_factors(g, x, weight_shape[2:], stride, padding, dilation):
        tap = out[:, :, ty, tx]
        if into is None and tap.is_contiguous():  # 1x1 kernels: straight into the result
            torch.mm(gs, xs, out=tap)
        elif into is None:
            tap.copy_(gs @ xs)
        else:
            tap.add_(gs @ xs)
        del gs, xs  # before tap_factors copies the next tap's
    return out


def tapwise_pays(weight_shape, device: torch.device, x_shape, stride, groups: int) -> bool:
    """Whether tapwise_weight_grad holds less than convolution_backward (measured on the CPU;
    cuDNN's buffers are its own, not measured yet): the weight larger than the input it is
    computed from, and not a 1x1 stride-1 conv (one GEMM either way)."""
    one_gemm = tuple(weight_shape[2:]) == (1, 1) and tuple(stride) == (1, 1)
    return (device.type == "cpu" and groups == 1 and not one_gemm
            and math.prod(weight_shape) > math.prod(x_shape))
