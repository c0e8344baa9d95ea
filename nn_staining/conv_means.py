"""A convolution's per-channel spatial means from its input, without reading its output.

A convolution is linear: the mean over output positions of channel ``c`` is
``bias[c] + Σ_{k, offsets} weight[c, k, offset] · M[k, offset]``, where ``M[k, offset]`` is the mean
of the (zero-padded) input channel ``k`` over the positions that kernel offset touches. ``M`` is a
separable strided window sum, one pass per kernel row over the input, so a layer with few input
channels and many output channels (a network's first convolution) is summarised from far fewer
values than its output holds. :func:`cheaper_from_input` says when that pays.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

#: Use the input only when it reads at most this fraction of the values the output holds.
MAX_READ_RATIO = 0.5


def supported(module: nn.Module) -> bool:
    """A ``Conv1d`` / ``Conv2d`` with zero padding given as numbers (not ``"same"``) and float32
    parameters: the modules whose means :func:`spatial_means` computes."""
    return (
        isinstance(module, (nn.Conv1d, nn.Conv2d))
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
        and module.weight.dtype == torch.float32
    )


def cheaper_from_input(module: nn.Module, x: Tensor, out: Tensor) -> bool:
    """Whether reading ``x`` once per kernel row (``spatial_means``) costs less than reading ``out``;
    never under autocast or for non-float32 tensors (the output's rounding would differ)."""
    if x.dtype != torch.float32 or out.dtype != torch.float32 or torch.is_autocast_enabled(x.device.type):
        return False
    spatial = x.dim() - 2
    rows = module.kernel_size[0] if spatial == 2 else 1
    padded = x[0, 0].numel() if spatial == 1 else (x.shape[-1] + 2 * module.padding[1])
    reads = rows * x.shape[1] * (out.shape[2] if spatial == 2 else 1) * padded
    return reads <= MAX_READ_RATIO * out[0].numel()


def spatial_means(module: nn.Conv1d | nn.Conv2d, x: Tensor, out_shape: tuple[int, ...]) -> Tensor:
    """(batch, out_channels) float32: the mean of ``module(x)`` over its spatial positions, computed
    from ``x`` (``out_shape`` is the output's shape, which fixes the number of positions)."""
    spatial = x.dim() - 2
    if spatial == 1:  # a Conv1d is a Conv2d of height 1
        x = x.unsqueeze(2)
        out_shape = (*out_shape[:2], 1, out_shape[2])
        weight = module.weight.unsqueeze(2)
        stride, dilation, padding = (1, module.stride[0]), (1, module.dilation[0]), (0, module.padding[0])
    else:
        weight, stride, dilation, padding = module.weight, module.stride, module.dilation, module.padding
    height, width = out_shape[2], out_shape[3]
    xp = F.pad(x, (padding[1], padding[1], padding[0], padding[0])) if any(padding) else x
    kh, kw = weight.shape[2], weight.shape[3]
    rows = torch.stack(
        [
            xp[:, :, a * dilation[0] : a * dilation[0] + stride[0] * (height - 1) + 1 : stride[0]].sum(2)
            for a in range(kh)
        ],
        dim=2,
    )  # (batch, in_channels, kh, padded width)
    windows = torch.stack(
        [
            rows[..., b * dilation[1] : b * dilation[1] + stride[1] * (width - 1) + 1 : stride[1]].sum(-1)
            for b in range(kw)
        ],
        dim=-1,
    )  # (batch, in_channels, kh, kw): sums over the output positions
    groups = module.groups
    n, channels = windows.shape[0], weight.shape[0]
    windows = windows.reshape(n, groups, -1, kh, kw)
    kernel = weight.reshape(groups, channels // groups, -1, kh, kw)
    means = torch.einsum("ngkab,gckab->ngc", windows, kernel).reshape(n, channels) / (height * width)
    return means if module.bias is None else means + module.bias
