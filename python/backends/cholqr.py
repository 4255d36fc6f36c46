"""Grouped thin QR of many tall-skinny float64 matrices: batched CholeskyQR2, Householder fallback.
The ``thin_qr`` of the Triton backend (``oplora.backends.triton_ops``).

The step engine factors, every pass, the weighted fixed factor ``Z = W F`` (p x r, float64) of
every half-step of every layer -- hundreds of small QRs per pass on a 7B model. LAPACK/cuSOLVER
Householder QR (``torch.linalg.qr``) runs them one launch sequence per matrix. Here the matrices
of one shape are stacked and factored together by CholeskyQR2, all in float64 batched torch ops
(a batched Gram, ``cholesky_ex``, a triangular solve, twice): a few launches per shape, whatever
the number of layers. This is plain torch, not Triton (it runs, and is tested, on any device
without Triton): at r <= 128 the work is a batched GEMM and r x r factorizations that
cuBLAS/cuSOLVER already do well in float64, and the engine hands the matrices over in float64
(see ``oplora.reference``'s precision policy).

CholeskyQR2 (Fukaya, Nakatsukasa, Yanagisawa, Yamamoto 2014)::

    L1 = chol(Z^T Z);  Q1 = Z L1^-T;  L2 = chol(Q1^T Q1);  Q = Q1 L2^-T;  R = L2^T L1^T

In float64 it is as accurate as Householder QR (orthogonality and residual at rounding level)
whenever cond(Z) is below about 1e7 -- SPEC section 2 asks for cond 1e4 in float32 factors.
A matrix is accepted only when both Cholesky factorizations succeed, everything is finite and
``Q1^T Q1`` is within 0.1 of the identity (then cond(Q1) <= 1.2, and the second pass is
orthogonal to rounding level). Every other matrix -- an exactly or numerically rank-deficient
``Z`` (LoRA's ``B = 0`` at init), or one too ill-conditioned for the Gram matrix -- is factored by
Householder QR instead, so the result always satisfies the ``oplora.reference.thin_qr``
contract: orthonormal ``Q`` (p x k), upper-triangular ``R`` (k x r), ``Z = Q R``,
``k = min(p, r)``. An all-zero ``Z`` needs no factorization at all: ``Q`` = the first k columns
of the identity, ``R = 0`` (Householder gives the same up to signs, and the engine's solve keeps
the start point along every zero singular value whatever ``Q`` is).

Which matrices fell back is known only after the batched factorization: one host
synchronisation per call (for all shapes together) reads the acceptance flags.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
from torch import Tensor

from .._checks import group_by

__all__ = ["thin_qr", "cholesky_qr2"]

#: Largest accepted deviation of ``Q1^T Q1`` from the identity (see the module docstring).
ORTHOGONALITY_GATE = 0.1


def cholesky_qr2(z: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Batched CholeskyQR2 of ``z`` (b x p x r, float64, p >= r).

    Returns ``(Q, R, ok)``: ``Q`` (b x p x r), ``R`` (b x r x r, upper triangular, positive
    diagonal), ``ok`` (b, bool) whether the factorization is accepted (see the module
    docstring). Rows of ``Q``/``R`` where ``ok`` is False are meaningless (finite). An all-zero
    matrix is accepted with ``Q`` = identity columns and ``R = 0``. Raises ``ValueError`` for
    another dtype or a wide shape.
    """
    if z.dim() != 3 or z.dtype != torch.float64 or z.shape[1] < z.shape[2]:
        raise ValueError(f"cholesky_qr2: expected a b x p x r float64 stack with p >= r, got {tuple(z.shape)} "
                         f"{z.dtype}")
    b, p, r = z.shape
    eye = torch.eye(r, dtype=z.dtype, device=z.device).expand(b, r, r)
    zero = z.abs().amax(dim=(1, 2)) == 0
    l1, info1 = torch.linalg.cholesky_ex(z.mT @ z)
    # Failed factorizations get the identity, so that the solves below stay finite.
    l1 = torch.where((info1 == 0)[:, None, None], l1, eye)
    q1 = torch.linalg.solve_triangular(l1.mT, z, upper=True, left=False)
    g2 = q1.mT @ q1
    l2, info2 = torch.linalg.cholesky_ex(g2)
    l2 = torch.where((info2 == 0)[:, None, None], l2, eye)
    q = torch.linalg.solve_triangular(l2.mT, q1, upper=True, left=False)
    r_mat = l2.mT @ l1.mT
    gate = (g2 - eye).abs().amax(dim=(1, 2)) <= ORTHOGONALITY_GATE
    finite = torch.isfinite(q).all(dim=(1, 2)) & torch.isfinite(r_mat).all(dim=(1, 2))
    ok = (info1 == 0) & (info2 == 0) & gate & finite
    ident = torch.eye(p, r, dtype=z.dtype, device=z.device).expand(b, p, r)
    q = torch.where(zero[:, None, None], ident, q)
    r_mat = torch.where(zero[:, None, None], torch.zeros_like(r_mat), r_mat)
    return q, r_mat, ok | zero


def thin_qr(zs: Sequence[Tensor]) -> List[Tuple[Tensor, Tensor]]:
    """Reduced QR of every ``Z`` in ``zs`` (each p x r, or a stack b x p x r, float64):
    ``[(Q, R)]`` with ``Q`` (p x k) orthonormal columns and ``R`` (k x r) upper triangular,
    ``Z = Q R``, ``k = min(p, r)`` (stacked like ``Z``).

    All matrices of one (p, r, device), from every item, are factored together by
    :func:`cholesky_qr2`; rejected ones by Householder (``torch.linalg.qr``), as are wide
    (p < r) and non-float64 items. Results are new tensors; ``zs`` is not modified.
    """
    out: List = [None] * len(zs)
    batched = [z.dim() in (2, 3) and z.dtype == torch.float64 and z.shape[-2] >= z.shape[-1] >= 1 for z in zs]
    for i, z in enumerate(zs):
        if not batched[i]:
            out[i] = torch.linalg.qr(z, mode="reduced")
    groups = group_by(range(len(zs)), lambda i: (tuple(zs[i].shape[-2:]), zs[i].device) if batched[i] else None)
    groups.pop(None, None)
    stacks = {i: zs[i] if zs[i].dim() == 3 else zs[i].unsqueeze(0) for index in groups.values() for i in index}
    factored = []
    for index in groups.values():
        parts = [stacks[i] for i in index]
        q, r_mat, ok = cholesky_qr2(parts[0] if len(parts) == 1 else torch.cat(parts))
        factored.append((index, q, r_mat, ok))
    if not factored:
        return out
    flags = torch.cat([ok for *_, ok in factored]).tolist()  # the one host synchronisation
    pos = 0  # into flags
    for index, q, r_mat, _ in factored:
        local = 0  # into this group's q, r_mat
        for i in index:
            z = stacks[i]
            qi, ri = q[local:local + len(z)], r_mat[local:local + len(z)]
            for j in range(len(z)):
                if not flags[pos + j]:  # q, r_mat are fresh tensors: fill in the fallback
                    qi[j], ri[j] = torch.linalg.qr(z[j], mode="reduced")
            pos += len(z)
            local += len(z)
            out[i] = (qi, ri) if zs[i].dim() == 3 else (qi[0], ri[0])
    return out
