"""Grouped r x r proximal least-squares solves of many half-steps: batched SVD, same-shape groups.

Every half-step ends with ``min_X ||R X - Y||^2 + lam ||X - X0||^2`` for a small ``R`` (k x r);
``oplora.reference.prox_solve`` solves one through the SVD of ``R``, treating singular values at
or below ``s_max * eps64 * (p + r)`` as exact zeros whose directions keep ``X0`` (rank-deficient
safe: the limit ``lam -> 0+``). Here the problems of one shape are stacked and solved with one
batched ``torch.linalg.svd`` and a few batched products: the same formula, per problem, with
its own ``lam`` and ``p`` -- a few launches per shape instead of a dozen per problem. Plain
torch in float64, not Triton: the matrices are r x r.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["prox_solve"]

Problem = Tuple[Tensor, Tensor, Tensor, float, int]


def _solve_stack(r_mat: Tensor, y: Tensor, x0: Tensor, lam: Tensor, p: Tensor) -> Tensor:
    """Batched ``reference.prox_solve``: ``R`` (b x k x r), ``Y`` (b x k x q), ``X0``
    (b x r x q), ``lam`` and ``p`` (b,) float64; returns X (b x r x q)."""
    r = x0.shape[1]
    u, s, vh = torch.linalg.svd(r_mat, full_matrices=False)
    cutoff = s.amax(dim=1, keepdim=True) * torch.finfo(torch.float64).eps * (p + r)[:, None]
    keep = s > cutoff
    s2 = s * s
    denom = torch.where(keep, s2 + lam[:, None], torch.ones_like(s))
    gain = torch.where(keep, s / denom, torch.zeros_like(s))
    pull = torch.where(keep, s2 / denom, torch.zeros_like(s))
    v = vh.mT
    solve = v @ (gain[:, :, None] * u.mT)  # b x r x k
    keep_start = torch.eye(r, dtype=torch.float64, device=x0.device) - v @ (pull[:, :, None] * vh)
    return solve @ y + keep_start @ x0


def prox_solve(problems: Sequence[Problem]) -> List[Tensor]:
    """``X = argmin ||R X - Y||^2 + lam ||X - X0||^2`` for every problem ``(R, Y, X0, lam, p)``
    (``R`` k x r, ``Y`` k x q, ``X0`` r x q, float64; ``lam >= 0``; ``p`` the rows of the
    least-squares problem ``R`` came from), exactly as ``oplora.reference.prox_solve`` per
    problem, batched over problems of one (shapes, device). Returns X (r x q, float64) per
    problem, new tensors. Raises ``ValueError`` for a non-float64 operand.
    """
    out: List = [None] * len(problems)
    groups: Dict[tuple, List[int]] = {}
    for i, (r_mat, y, x0, _, _) in enumerate(problems):
        for name, t in (("R", r_mat), ("Y", y), ("X0", x0)):
            if t.dtype != torch.float64:
                raise ValueError(f"prox_solve: problem {i}: {name} must be float64, got {t.dtype}")
        groups.setdefault((tuple(r_mat.shape), tuple(y.shape), tuple(x0.shape), r_mat.device), []).append(i)
    for index in groups.values():
        device = problems[index[0]][0].device
        stack = [torch.stack([problems[i][j] for i in index]) for j in range(3)]
        lam = torch.tensor([float(problems[i][3]) for i in index], dtype=torch.float64, device=device)
        p = torch.tensor([float(problems[i][4]) for i in index], dtype=torch.float64, device=device)
        for i, x in zip(index, _solve_stack(*stack, lam, p).unbind(0)):
            out[i] = x
    return out
