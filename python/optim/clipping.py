"""Gradient clipping of the implicit full gradient (SPEC section 3): the norm the optimizers clip by.

The total is ``sqrt(sum_layers ||G||_F^2 + sum_other ||p.grad||^2)`` with each layer's implicit
``G = sD^T X`` (m x n), measured from the captured rows without forming G when that is cheaper
(:func:`grad_sq_norm`), as ``torch.nn.utils.clip_grad_norm_`` would measure it over full weights;
the rows captured under a GradScaler loss scale are unscaled. The optimizer multiplies the LoRA
gradient term of the step, the momentum and the statistics by the coefficient
``min(1, max_grad_norm / (total + 1e-6))`` (through the step context's ``grad_coeff``: X and sD
are never copied) and the other parameters' ``.grad`` in place, as clip_grad_norm_ does.
RiemannianLoRA steps from the factor gradients: its norm is clip_grad_norm_'s over every ``.grad``.
"""

from __future__ import annotations

import math
from typing import Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..capture import rows as _rows
from .._checks import group_by
from ..reference import compute_dtype
from ..capture.sites import LoRASite
from .statistics import grad_blocks

__all__ = ["grad_sq_norm", "site_sq_norm", "total_norm"]

Chunks = Sequence[Tuple[Tensor, Tensor]]


def _row_blocks(chunks: Chunks, dtype: torch.dtype, block: int) -> List[Tuple[Tensor, Tensor]]:
    """The rows of every chunk in blocks of at most ``block`` rows, in ``dtype`` (views when the
    dtype already matches; otherwise one converted copy of the rows in all)."""
    out = []
    for x, g in chunks:
        for lo in range(0, x.shape[0], block):
            out.append((_rows.to(x[lo:lo + block], dtype), g[lo:lo + block].to(dtype)))
    return out


def grad_sq_norm(chunks: Chunks, *, method: str = "auto", block: int = 1024, n: Optional[int] = None) -> Tensor:
    """``||G||_F^2`` of a layer's implicit gradient ``G = sum_j sD_j^T X_j`` (m x n), as a 0-dim
    float64 tensor on the rows' device; computed in float32 (float64 for float64 rows), summed
    in float64. ``chunks``: pairs ``(X_j, sD_j)`` (T_j x n, T_j x m), T rows in all; X_j may be
    index rows (``oplora.capture.rows``: token ids), whose width ``n`` must then be given.

    Three ways to get it, by cost (multiply-adds):

    * ``"rows"``: the T x T row Grams, ``||G||^2 = sum_{i,k} <X_i X_k^T, sD_i sD_k^T>`` over
      blocks i, k of at most ``block`` rows (``(i, k)`` and ``(k, i)`` counted once, doubled):
      ``T^2 (m + n) / 2`` work, ``2 block^2`` memory -- the cheaper one for few rows;
    * ``"explicit"``: G formed in blocks of ``block`` of its m rows (``G[lo:hi] = sum_j
      sD_j[:, lo:hi]^T X_j``, never all of m x n at once): ``T m n`` work, ``block n`` memory --
      the cheaper one when ``T (m + n) / 2 > m n``;
    * the column Grams ``<X^T X, sD^T sD>`` (n x n, m x m) are never cheaper than ``"explicit"``:
      ``T (n^2 + m^2) >= 2 T m n`` work and ``n^2 + m^2 >= 2 m n`` memory, so they are not used.

    ``"auto"`` (default) picks the cheaper of the first two. Nothing is modified.
    """
    if method not in ("auto", "rows", "explicit"):
        raise ValueError(f"method must be 'auto', 'rows' or 'explicit', got {method!r}")
    dtype = compute_dtype(*(t for pair in chunks for t in pair))
    rows = sum(x.shape[0] for x, _ in chunks)
    m = chunks[0][1].shape[1]
    if n is None:
        n = chunks[0][0].shape[1]
    if method == "auto":
        method = "rows" if rows * (m + n) <= 2 * m * n else "explicit"
    total = torch.zeros((), dtype=torch.float64, device=chunks[0][0].device)
    if method == "rows":
        blocks = _row_blocks(chunks, dtype, block)
        for i, (xi, gi) in enumerate(blocks):
            total += (_rows.row_gram(xi, xi, dtype) * (gi @ gi.mT)).sum(dtype=torch.float64)
            for xk, gk in blocks[i + 1:]:
                total += 2.0 * (_rows.row_gram(xi, xk, dtype) * (gi @ gk.mT)).sum(dtype=torch.float64)
        # Rounding can leave a tiny negative sum when G is (nearly) zero.
        return total.clamp_min(0.0)
    for _, g_blk in grad_blocks(chunks, dtype, block, n=n):
        total += g_blk.square().sum(dtype=torch.float64)
    return total


def site_sq_norm(site: LoRASite) -> Tensor:
    """``||F + G_rows||_F^2`` of a layer whose gradient is its folded part ``F`` plus its held rows:
    ``||F||^2 + 2 sum_j <F, sD_j^T X_j> + ||G_rows||^2``, the cross terms as ``sum((sD_j F) * X_j)``
    (T_j x n: no m x n product of rows is formed)."""
    chunks = [(x, g) for x, g, _ in site.chunks]
    total = grad_sq_norm(chunks, n=site.shape[1]) if chunks else None
    if site.folded is not None:  # a sketched layer: the norm of its sketched gradient (oplora.capture.sketch)
        dense = site.folded.sq_norm()
        for x, g in chunks:
            dense = dense + 2.0 * _rows.inner(x, site.folded.rows_times(g))
        total = dense if total is None else total + dense
    return total.clamp_min(0.0)


def total_norm(sites: Sequence[LoRASite], grads: Iterable[Tensor], inv_scale: float) -> float:
    """``sqrt(sum_sites ||coeff G||_F^2 * inv_scale^2 + sum ||grad||^2)``: the captured layers'
    implicit gradients (rows captured under a loss scale, unscaled by ``inv_scale``; rescaled since
    by the site's ``coeff``, e.g. a ``clip_grad_norm_`` of the factors' ``.grad``) and the other
    gradients ``grads`` (already unscaled), one host sync per device."""
    parts: List[Tensor] = [site_sq_norm(site) * (inv_scale * site.coeff)**2 for site in sites if site.held]
    parts += [torch.linalg.vector_norm(g, dtype=torch.float64).square() for g in grads]
    return math.sqrt(sum(float(torch.stack([parts[i] for i in index]).sum())
                         for index in group_by(parts, lambda t: t.device).values()))
