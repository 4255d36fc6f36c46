"""The captured X of a chunk in either of its two forms, and the few products the package takes
with it. A leaf module: it imports nothing of the package.

* **dense rows**: a float tensor ``X`` (T x n) -- the inputs of a Linear LoRA branch, the unfolded
  patches of a Conv one;
* **index rows**: a 1-D integer tensor ``ids`` (T,) standing for ``X = one_hot(ids, n)`` (T x n),
  the token ids of an Embedding LoRA branch. X is never formed (n is the vocabulary): every
  product becomes a gather or an ``index_add``::

      X q          = q[ids]                                  (T x k)
      X^T v        = zeros(n, k).index_add_(0, ids, v)       (n x k)
      colsum(X^2)  = zeros(n).index_add_(0, ids, ones)       (n,)   the token counts
      X^T X        = diag(colsum(X^2))                       (n x n)
      X_i X_k^T    = [ids_i[a] == ids_k[b]]                  (T_i x T_k)
      G += sD^T X  : G.index_add_(1, ids, sD^T)              (m x n)

Each function takes either form and returns what the dense formula would, in ``dtype`` (or the
dtype of the float operand); nothing is modified but the ``out`` argument where there is one.
The step engine's products over index rows (:func:`row_pass`) are these torch ops: a fused
kernel would not pay (one gather and one scatter per product).
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["is_index", "to", "x_times", "xt_times", "col_sq", "add_gt_x", "add_gram", "row_gram", "inner",
           "row_pass"]


def is_index(x: Tensor) -> bool:
    """Whether ``x`` holds index rows (token ids) rather than dense rows."""
    return not x.is_floating_point()


def to(x: Tensor, dtype: torch.dtype) -> Tensor:
    """Dense rows in ``dtype``; index rows as they are (ids have no float dtype)."""
    return x if is_index(x) else x.to(dtype)


def x_times(x: Tensor, q: Tensor) -> Tensor:
    """``X q`` (T x k) for ``q`` (n x k)."""
    return q.index_select(0, x) if is_index(x) else x.to(q.dtype) @ q


def xt_times(x: Tensor, v: Tensor, n: int) -> Tensor:
    """``X^T v`` (n x k) for ``v`` (T x k)."""
    if is_index(x):
        return v.new_zeros(n, v.shape[1]).index_add_(0, x, v)
    return x.to(v.dtype).mT @ v


def col_sq(x: Tensor, n: int, dtype: torch.dtype, weights: Optional[Tensor] = None) -> Tensor:
    """``colsum(X^2)`` (n,) (for index rows the token counts), or with ``weights`` (T,)
    ``colsum(diag(w) X^2)``; no host synchronisation (``bincount`` would size its output)."""
    if is_index(x):
        w = torch.ones(x.shape[0], dtype=dtype, device=x.device) if weights is None else weights.to(dtype)
        return torch.zeros(n, dtype=dtype, device=x.device).index_add_(0, x, w)
    sq = x.to(dtype).square()
    return sq.sum(0) if weights is None else weights.to(dtype) @ sq


def add_gt_x(out: Tensor, g: Tensor, x: Tensor) -> Tensor:
    """``out += g^T X`` in place (out m x n, g T x m); returns ``out``."""
    if is_index(x):
        return out.index_add_(1, x, g.to(out.dtype).mT)
    return out.addmm_(g.to(out.dtype).mT, x.to(out.dtype))


def add_gram(out: Tensor, x: Tensor, live: Optional[Tensor] = None) -> Tensor:
    """``out += X^T X`` in place (out n x n), or with the row mask ``live`` (T,) the Gram of the
    live rows only; returns ``out``."""
    if is_index(x):
        out.diagonal().add_(col_sq(x, out.shape[0], out.dtype, live))
        return out
    xd = x.to(out.dtype)
    return out.addmm_((xd if live is None else xd * live.to(out.dtype)[:, None]).mT, xd)


def row_gram(xi: Tensor, xk: Tensor, dtype: torch.dtype) -> Tensor:
    """``X_i X_k^T`` (T_i x T_k), both of one form."""
    if is_index(xi):
        return (xi[:, None] == xk[None, :]).to(dtype)
    return xi.to(dtype) @ xk.to(dtype).mT


def inner(x: Tensor, y: Tensor) -> Tensor:
    """``<X, Y>`` = sum of ``X * Y`` for a dense ``y`` (T x n), as a 0-dim float64 tensor."""
    if is_index(x):
        return y.gather(1, x[:, None]).sum(dtype=torch.float64)
    return (y * x.to(y.dtype)).sum(dtype=torch.float64)


def row_pass(xs: Sequence[Tensor], gs: Sequence[Tensor], qd: Optional[Tensor], qx: Optional[Tensor],
             stats: bool, n: int) -> Tuple[Optional[Tensor], ...]:
    """``oplora.reference.row_pass`` for chunks of either form (``n``: the width of X): ``G^T qd``
    (n x Kd), ``G qx`` (m x Kx) and, with ``stats``, ``colsum(X^2)`` (n,) and ``colsum(G^2)``
    (m,) of ``G = sum_j G_j^T X_j``, in the dtype of ``gs``."""
    dtype = gs[0].dtype
    px = pd = sx = sg = None
    if qd is not None:
        px = sum(xt_times(x, g @ qd, n) for x, g in zip(xs, gs))
    if qx is not None:
        pd = sum(g.mT @ x_times(x, qx) for x, g in zip(xs, gs))
    if stats:
        sx = sum(col_sq(x, n, dtype) for x in xs)
        sg = sum(g.square().sum(0) for g in gs)
    return px, pd, sx, sg
