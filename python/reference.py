"""Pure-torch reference of every oplora op: the specification the fast paths are checked against.

Tests and benchmarks import this module; the Triton and C++ backends must agree with it.
It is also the ``torch`` backend that ``oplora.backends`` dispatches to. Functions here take
already-validated input (``oplora.lorsum`` validates); they never modify their arguments.

LoRSum (SPEC section 2)
-----------------------
Given thin terms ``(U_i, V_i)`` (``U_i`` m x k_i, ``V_i`` k_i x n), coefficients ``c_i``, a start
point ``(B0, A0)`` (m x r, r x n), a proximal weight ``lam`` and an optional metric
``(M_out, M_in)``, the target is ``T = sum_i c_i T_i`` with ``T_i = U_i V_i``, or
``T_i = M_out^-1 U_i V_i M_in^-1`` for a preconditioned term. One round is two half-steps:

    A-half-step  (B fixed):  min_A ||W_out (B A - T)||^2 + lam ||A - A0||^2
    B-half-step  (A fixed):  min_B ||(B A - T) W_in^T||^2 + lam ||B - B0||^2

where ``W^T W = M`` (``W = diag(sqrt(d))`` for a diagonal metric, ``W = L^T`` for the Cholesky
factor ``M = L L^T`` of a dense one). Their normal equations are SPEC's
``(B^T M_out B + lam I) A = lam A0 + B^T M_out T`` and
``B (A M_in A^T + lam I) = lam B0 + T M_in A^T``. The B-half-step is the A-half-step of the
transposed problem (``T^T = sum c_i V_i^T U_i^T``), so both go through one function,
``_half_step``, whose stages (:func:`thin_qr`, :func:`half_rhs`, :func:`prox_solve`) are also
the optimizer step engine's: there is one implementation of a half-step.

How a half-step is solved, and why
    Forming ``B^T M B`` squares the condition number of the factor: in float32 at cond 1e4 the
    normal equations lose most of the product. Instead ``Z = W F`` (the fixed factor, p x r) is
    reduced by a Householder QR, ``Z = Q R``, and the problem becomes
    ``min ||R X - Q^T W T||^2 + lam ||X - X0||^2`` with a small k x r matrix ``R``
    (k = min(p, r)). That is solved exactly through the SVD of ``R``, ``R = U S V^T``:

        X = V diag(s / (s^2 + lam)) U^T Y  +  (I - V diag(s^2 / (s^2 + lam)) V^T) X0,
        Y = Q^T W T

    No Gram matrix is formed anywhere. ``W F`` and its QR are computed in float64 from the given
    factor, so a singular value of ``R`` at or below ``s_max * eps64 * (p + r)`` is rounding noise
    of an exactly rank-deficient factor; it counts as an exact zero and its direction keeps the
    start value. That is the limit ``lam -> 0+``: the least-squares solution nearest the start
    point (B = 0 at LoRA init leaves A at A0). Anything above is real: a float32 factor of
    condition number 1e6, weighted by a metric spanning 1e2, is still solved as full rank.

    ``Y`` is never formed from an m x n matrix: ``Q^T W T = sum_i c_i ((W^T Q)^T U_i) V_i``, and
    a preconditioned term uses ``W^-1 Q = M^-1 W^T Q`` on the left and ``M_in^-1`` applied to the
    r x n sum on the right. Every product is (p x r)^T (p x k) or (r x k)(k x q).

The optimizer step (``oplora.optim.engine``) runs the same half-steps on the captured rows
through three ops of this module: ``row_pass`` (the only op that reads X and sD: every thin
product of one half-step of several LoRSum problems, plus the diagonal K-FAC statistics, in one
pass; the C++ and Triton backends each have a fused one), ``thin_qr`` and ``prox_solve`` (the
engine hands them stacks of same-shaped layers' matrices; the Triton backend has a batched
CholeskyQR2 for ``thin_qr``).

Precision policy
    The big products -- the only ones that read the terms, O((p + q) k r) work -- run in the
    compute dtype: float32 for float16/bfloat16/float32 input, float64 when any input is float64.
    The thin work (the factors between half-steps, ``W F``, its QR, the r x r solve, the metric,
    O((p + q) r^2) work) runs in float64. A float32 QR perturbs the factor by eps * ||F||, which
    the least-squares problem amplifies by cond(F): at cond 1e4 that cost ~5e-4 of the product;
    in float64 the result is as accurate as rounding the exact answer to float32 (~3e-5 at
    cond 1e4, see tests/lorsum/test_lorsum.py). Results come back in the start point's dtype, as new
    tensors.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

__all__ = ["lorsum", "compute_dtype", "row_pass", "thin_qr", "prox_solve", "half_operators", "half_rhs", "Metric"]


def compute_dtype(*tensors: Optional[Tensor]) -> torch.dtype:
    """float64 if any given tensor is float64, otherwise float32 (SPEC: compute in fp32)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


class Metric:
    """One side's metric ``M`` (p x p) as the few operators a half-step needs, in float64.

    ``M`` is ``None`` (identity), a positive vector ``d`` (``M = diag(d)``) or an SPD matrix
    (``M = L L^T``). With ``W`` such that ``W^T W = M``: ``weight(F) = W F``,
    ``weight_t(Q) = W^T Q``, ``unweight(Q) = W^-1 Q = M^-1 W^T Q`` (all p x r) and
    ``solve_right(Y) = Y M^-1`` for an r x p ``Y``. Inputs and outputs are float64.

    ``batched=True``: ``m`` is a stack (b x p, or b x p x p) of the metrics of b problems, and
    the operators take stacks (b x p x r, b x r x p), one metric per problem.
    """

    def __init__(self, m: Optional[Tensor], batched: bool = False):
        self.kind = "identity" if m is None else ("diag" if m.dim() == 1 + batched else "dense")
        if self.kind == "diag":
            self.d = m.double()
            self.sqrt_d = self.d.sqrt().unsqueeze(-1)
        elif self.kind == "dense":
            self.L = torch.linalg.cholesky(m.double())

    def weight(self, f: Tensor) -> Tensor:
        if self.kind == "diag":
            return self.sqrt_d * f
        if self.kind == "dense":
            return self.L.mT @ f
        return f

    def weight_t(self, q: Tensor) -> Tensor:
        if self.kind == "diag":
            return self.sqrt_d * q
        if self.kind == "dense":
            return self.L @ q
        return q

    def unweight(self, q: Tensor) -> Tensor:
        if self.kind == "diag":
            return q / self.sqrt_d
        if self.kind == "dense":
            return torch.linalg.solve_triangular(self.L.mT, q, upper=True)
        return q

    def solve_right(self, y: Tensor) -> Tensor:
        if self.kind == "diag":
            return y / self.d.unsqueeze(-2)
        if self.kind == "dense":
            return torch.cholesky_solve(y.mT, self.L).mT
        return y


def prox_solve(r_mat: Tensor, y: Tensor, x0: Tensor, lam: Union[float, Tensor], p: Union[int, Tensor]) -> Tensor:
    """Solve ``min_X ||R X - Y||^2 + lam ||X - X0||^2`` through the SVD of the small ``R``.

    ``R`` is k x r (k = min(p, r)), ``Y`` k x q, ``X0`` r x q, all float64; ``p`` the rows of the
    least-squares problem ``R`` came from. Singular values at or below ``s_max * eps64 * (p + r)``
    are exact zeros: their directions keep ``X0``. See the module docstring.

    Batched: ``R``, ``Y``, ``X0`` may carry the same leading dimensions (a stack of problems, each
    solved on its own, with its own cutoff); ``lam`` and ``p`` are then numbers shared by all, or
    float64 tensors of the leading shape.
    """
    r = x0.shape[-2]
    u, s, vh = torch.linalg.svd(r_mat, full_matrices=False)
    lam = lam.unsqueeze(-1) if isinstance(lam, Tensor) else lam
    p = p.unsqueeze(-1) if isinstance(p, Tensor) else p
    keep = s > s.amax(-1, keepdim=True) * torch.finfo(torch.float64).eps * (p + r)
    s2 = s * s
    denom = torch.where(keep, s2 + lam, torch.ones_like(s))
    gain = torch.where(keep, s / denom, torch.zeros_like(s))
    pull = torch.where(keep, s2 / denom, torch.zeros_like(s))
    v = vh.mT
    solve = v @ (gain.unsqueeze(-1) * u.mT)  # r x k
    keep_start = torch.eye(r, dtype=torch.float64, device=x0.device) - v @ (pull.unsqueeze(-1) * vh)
    return solve @ y + keep_start @ x0


def thin_qr(z: Tensor) -> Tuple[Tensor, Tensor]:
    """Reduced QR of a tall-skinny float64 ``Z`` (p x r): ``Q`` (p x k) with orthonormal columns
    and upper-triangular ``R`` (k x r), ``k = min(p, r)``, ``Z = Q R`` (Householder, LAPACK).
    A stack (b x p x r) is factored matrix by matrix."""
    return torch.linalg.qr(z, mode="reduced")


def row_pass(
    xs: Sequence[Tensor],
    gs: Sequence[Tensor],
    qd: Optional[Tensor],
    qx: Optional[Tensor],
    stats: bool = False,
) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """One pass over a layer's rows: the products of the implicit gradient
    ``G = sum_j G_j^T X_j`` (m x n) with thin matrices that LoRSum half-steps need, for several
    right-hand sides at once.

    ``xs``: ``X_j`` (T_j x n), ``gs``: ``G_j`` (T_j x m, the captured ``s D_j``), in the compute
    dtype; ``qd`` (m x Kd) and ``qx`` (n x Kx) the right-hand sides (or None). Returns

        px = G^T qd = sum_j X_j^T (G_j qd)    (n x Kd)   the A-side half-steps
        pd = G qx   = sum_j G_j^T (X_j qx)    (m x Kx)   the B-side half-steps
        sx = sum_j colsum(X_j^2)              (n,)       diagonal K-FAC statistics (``stats``)
        sg = sum_j colsum(G_j^2)              (m,)

    (None for what was not asked), in the compute dtype. ``G = sum_j G_j^T X_j`` (m x n) is never
    formed: each product is two skinny matrix products through a T_j x K intermediate.
    """
    px = sum(x.mT @ (g @ qd) for x, g in zip(xs, gs)) if qd is not None else None
    pd = sum(g.mT @ (x @ qx) for x, g in zip(xs, gs)) if qx is not None else None
    sx = sg = None
    if stats:
        sx = sum(x.square().sum(0) for x in xs)
        sg = sum(g.square().sum(0) for g in gs)
    return px, pd, sx, sg


def half_operators(metric: Metric, qmat: Tensor, preconditioned: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """The left operators of a half-step whose weighted fixed factor is ``W F = Q R``:
    ``W^T Q`` for plain terms and, when any term is ``preconditioned``, ``W^-1 Q = M^-1 W^T Q``
    (float64, p x k, or stacks)."""
    return metric.weight_t(qmat), metric.unweight(qmat) if preconditioned else None


def half_rhs(
    q_plain: Tensor,
    q_prec: Optional[Tensor],
    terms: Sequence[Tuple[Tensor, Tensor, float, bool]],
    metric_q: Metric,
    dtype: torch.dtype,
    known: Tuple[Optional[Tensor], Optional[Tensor]] = (None, None),
) -> Tensor:
    """The right-hand side ``Y = Q^T W T`` of a half-step (float64, k x q, or stacks), with
    ``T = sum_i c_i L_i R_i`` over ``terms`` ``(L_i p x k_i, R_i k_i x q, c_i, precondition_i)``
    in the compute ``dtype``; a preconditioned term is ``M_p^-1 L_i R_i M_q^-1``.

    ``known``: float64 parts of ``(Y_plain, Y_prec)`` computed elsewhere -- the optimizer step's
    data term, whose product with the rows comes from ``row_pass``. Each term's small factor
    ``Q'^T L_i`` (k x k_i) is scaled by ``c_i`` in float64 before the product with ``R_i``, so
    that a term of huge entries with a tiny coefficient does not overflow the compute dtype; the
    sums are float64. A term given in float64 is computed in float64 whatever ``dtype``: the
    start point's own term ``(B0, A0)``, whose product is most of ``T`` when the step is small --
    in float32 its rounding (``eps * |B0 A0|``) would swamp a step of a few ulps of the factors.
    """
    y_plain, y_prec = known
    for left, right, c, pre in terms:
        if c == 0.0:
            continue
        kind = torch.float64 if left.dtype == torch.float64 else dtype
        small = (q_prec if pre else q_plain).to(kind).mT @ left  # k x k_i
        term = ((small.double() * c).to(kind) @ right).double()
        if pre:
            y_prec = term if y_prec is None else y_prec + term
        else:
            y_plain = term if y_plain is None else y_plain + term
    if y_prec is None:
        return y_plain if y_plain is not None else q_plain.new_zeros(*q_plain.shape[:-2], q_plain.shape[-1],
                                                                     terms[0][1].shape[-1])
    y_prec = metric_q.solve_right(y_prec)
    return y_prec if y_plain is None else y_plain + y_prec


def _half_step(
    f: Tensor,
    x0: Tensor,
    terms: Sequence[Tuple[Tensor, Tensor, float, bool]],
    metric_p: Metric,
    metric_q: Metric,
    lam: float,
    dtype: torch.dtype,
) -> Tensor:
    """``argmin_X ||W_p (F X - T)||^2 + lam ||X - X0||^2`` with ``T`` the sum of ``terms`` (see
    :func:`half_rhs`). ``F`` p x r and ``X0`` r x q are float64; the terms are in the compute
    ``dtype`` (the only operands the big products touch), but for the start point's own term, in
    float64. Returns X (r x q, float64).

    The optimizer step engine (``oplora.optim.engine``) runs the same three stages --
    :func:`thin_qr` of the weighted factor, :func:`half_rhs`, :func:`prox_solve` -- with the
    products of the captured rows from ``row_pass`` in between.
    """
    qmat, r_mat = thin_qr(metric_p.weight(f))
    q_plain, q_prec = half_operators(metric_p, qmat, any(t[3] for t in terms))
    y = half_rhs(q_plain, q_prec, terms, metric_q, dtype)
    return prox_solve(r_mat, y, x0, lam, f.shape[0])


def lorsum(terms: Sequence[Tuple[Tensor, Tensor]], coeffs: Sequence[float], init: Tuple[Tensor, Tensor], *,
           iters: int = 1, prox: float = 0.0, metric: Optional[Tuple[Optional[Tensor], Optional[Tensor]]] = None,
           precondition: Optional[Sequence[bool]] = None, start: str = "A") -> Tuple[Tensor, Tensor]:
    """Reference LoRSum: rank-r factors ``(B, A)`` of ``T = sum_i c_i T_i`` by alternating
    proximal least squares. Same contract as :func:`oplora.lorsum`, without input validation.

    ``iters = 0`` is the Jacobi step (A from B0 and B from A0, at once); ``iters >= 1`` runs that
    many rounds, A side first (``start="A"``) or B side first (``start="B"``), each half-step
    anchored at ``init`` with weight ``prox``.
    """
    b0, a0 = init
    metric = metric if metric is not None else (None, None)
    dtype = compute_dtype(b0, a0, *metric, *(t for pair in terms for t in pair))
    precondition = [False] * len(terms) if precondition is None else [bool(x) for x in precondition]
    coeffs = [float(c) for c in coeffs]
    lam = float(prox)
    m_out, m_in = Metric(metric[0]), Metric(metric[1])
    # A term that is the start point itself (the same tensors: the optimizers' ``(B, A)``) is kept
    # in float64, so that a step of a few ulps of the factors is not lost in its rounding.
    own = [u is b0 and v is a0 for u, v in terms]
    us = [u.double() if mine else u.to(dtype) for (u, _), mine in zip(terms, own)]
    vs = [v.double() if mine else v.to(dtype) for (_, v), mine in zip(terms, own)]
    a_terms = list(zip(us, vs, coeffs, precondition))
    b_terms = list(zip([v.mT for v in vs], [u.mT for u in us], coeffs, precondition))
    b0_64, a0_64 = b0.double(), a0.double()

    def a_step(b: Tensor) -> Tensor:
        return _half_step(b, a0_64, a_terms, m_out, m_in, lam, dtype)

    def b_step(a: Tensor) -> Tensor:
        return _half_step(a.mT, b0_64.mT, b_terms, m_in, m_out, lam, dtype).mT

    if iters == 0:
        a, b = a_step(b0_64), b_step(a0_64)
    else:
        b, a = b0_64, a0_64
        for _ in range(iters):
            if start == "A":
                a = a_step(b)
                b = b_step(a)
            else:
                b = b_step(a)
                a = a_step(b)
    return b.to(b0.dtype).contiguous(), a.to(b0.dtype).contiguous()
