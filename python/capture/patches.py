"""The unfolded patches (im2col) of a Conv LoRA branch's input, formed in blocks of rows: the X
of a ``"conv"`` site (``oplora.capture.sites``), never a whole batch's patches at once."""

from __future__ import annotations

import math
from typing import Iterator, Optional, Tuple

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PATCH_BLOCK", "conv_patches"]

#: Numbers of unfolded Conv patches formed at once in a backward pass (16 MiB of float32); at
#: least one output row of one sample.
PATCH_BLOCK = 1 << 22


def _conv_windows(conv: nn.Module, x: Tensor) -> Tensor:
    """The patches of ``x`` (N x C x S_1..S_d) for ``conv`` as a view (N, L_1..L_d, C, k_1..k_d):
    ``x`` padded as ``conv`` pads it (a copy only when it pads), then strided windows."""
    d = x.dim() - 2
    pad = conv._reversed_padding_repeated_twice
    if any(pad):
        x = F.pad(x, pad, mode="constant" if conv.padding_mode == "zeros" else conv.padding_mode)
    for i in range(d):
        x = x.unfold(2 + i, conv.dilation[i] * (conv.kernel_size[i] - 1) + 1, conv.stride[i])
    if any(dl != 1 for dl in conv.dilation):
        x = x[(Ellipsis,) + tuple(slice(None, None, dl) for dl in conv.dilation)]
    return x.permute(0, *range(2, 2 + d), 1, *range(2 + d, 2 + 2 * d))


def conv_patches(conv: nn.Module, x: Tensor, block: Optional[int] = None) -> Iterator[Tuple[int, int, Tensor]]:
    """The unfolded patches (im2col) of ``x`` (N x C x S_1..S_d) for ``conv`` in blocks of rows:
    ``(lo, hi, P)``, P = rows ``lo:hi`` of the (N L) x (C k_1..k_d) patch matrix. Rows follow the
    output positions (sample, then position in row-major order: the order of conv's output
    (N, m, L_1..L_d) moved to (N, L_1..L_d, m)); columns follow the flattened kernel
    (r, C, k_1..k_d). A block holds about ``block`` numbers, at least one output row (positions
    of one index of L_1) of one sample (default :data:`PATCH_BLOCK`); only the block is materialized."""
    block = PATCH_BLOCK if block is None else block
    win = _conv_windows(conv, x)
    d = x.dim() - 2
    count, spatial = win.shape[0], tuple(win.shape[1:1 + d])
    positions, width = math.prod(spatial), math.prod(win.shape[1 + d:])
    per_block = max(1, block // max(width, 1))
    if positions <= per_block:
        step = per_block // positions
        for s in range(0, count, step):
            hi = min(s + step, count)
            yield s * positions, hi * positions, win[s:hi].reshape(-1, width)
        return
    inner = positions // spatial[0]
    step = max(1, per_block // inner)
    for s in range(count):
        for lo in range(0, spatial[0], step):
            hi = min(lo + step, spatial[0])
            yield s * positions + lo * inner, s * positions + hi * inner, win[s, lo:hi].reshape(-1, width)
