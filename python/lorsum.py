"""``oplora.lorsum``: the public LoRSum entry point (validation, then the reference, ``oplora.reference.lorsum``)."""

from __future__ import annotations

import math
import numbers
import operator
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import reference
from ._checks import first_nonfinite

__all__ = ["lorsum"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_tensor(t, name: str, shape_hint: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor ({shape_hint}), got {type(t).__name__}")
    if t.layout != torch.strided:
        raise ValueError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
    if t.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    return t


def _check_2d(t, name: str, shape_hint: str) -> Tensor:
    t = _check_tensor(t, name, shape_hint)
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D ({shape_hint}), got shape {tuple(t.shape)}")
    return t


def _check_finite(named: Sequence[Tuple[str, Tensor]]) -> None:
    """Raise ValueError naming the first tensor with a NaN or Inf (or a meta tensor)."""
    for name, t in named:
        if t.device.type == "meta":
            raise ValueError(f"{name} is a meta tensor: it has no values to compute with")
    bad = first_nonfinite([t for _, t in named])
    if bad is not None:
        raise ValueError(f"{named[bad][0]} contains NaN or Inf")


def _check_real(x, name: str, *, minimum: Optional[float] = None) -> float:
    if isinstance(x, Tensor):
        if x.numel() != 1 or x.is_complex():
            raise ValueError(f"{name} must be a real scalar, got a tensor of shape {tuple(x.shape)}")
        x = x.item()
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {type(x).__name__}")
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {x}")
    if minimum is not None and x < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {x}")
    return x


def _check_metric_side(mat, name: str, size: int, side: str, device: torch.device) -> Optional[Tensor]:
    if mat is None:
        return None
    mat = _check_tensor(mat, name, f"a positive vector of length {size} or an SPD {size} x {size} matrix")
    if mat.device != device:
        raise ValueError(f"{name} is on {mat.device} but init is on {device}")
    _check_finite([(name, mat)])
    if mat.dim() == 1:
        if mat.shape[0] != size:
            raise ValueError(f"{name} is a vector of length {mat.shape[0]}, but {side} = {size}")
        if not bool((mat > 0).all()):
            raise ValueError(f"{name} must be positive: its smallest entry is {mat.min().item():.3g}")
        return mat
    if mat.dim() != 2 or tuple(mat.shape) != (size, size):
        raise ValueError(f"{name} must be a vector of length {size} or a {size} x {size} matrix ({side} = {size}), "
                         f"got shape {tuple(mat.shape)}")
    m64 = mat.double()
    asym = float((m64 - m64.mT).abs().max())
    if asym > 10 * torch.finfo(mat.dtype).eps * float(m64.abs().max()):  # rounding-level asymmetry is fine
        raise ValueError(f"{name} must be symmetric positive definite: it is not symmetric "
                         f"(max |M - M^T| = {asym:.3g})")
    if int(torch.linalg.cholesky_ex(mat.float() if mat.dtype in (torch.float16, torch.bfloat16) else mat).info) != 0:
        raise ValueError(f"{name} must be symmetric positive definite: its Cholesky factorisation failed")
    return mat


def lorsum(
    terms: Sequence[Tuple[Tensor, Tensor]],
    coeffs: Sequence[float],
    init: Tuple[Tensor, Tensor],
    *,
    iters: int = 1,
    prox: float = 0.0,
    metric: Optional[Tuple[Optional[Tensor], Optional[Tensor]]] = None,
    precondition: Optional[Sequence[bool]] = None,
    start: str = "A",
) -> Tuple[Tensor, Tensor]:
    """Rank-r factors of a sum of thin products, by alternating proximal least squares.

    Computes ``(B, A)`` (m x r, r x n) approximating ``T = sum_i c_i T_i`` where
    ``T_i = U_i V_i`` (``U_i`` m x k_i, ``V_i`` k_i x n) or, for a term with
    ``precondition[i]``, ``T_i = M_out^-1 U_i V_i M_in^-1``. Starting from ``init = (B0, A0)``,
    each round solves exactly (SPEC section 2)::

        A <- argmin ||M_out^1/2 (B A - T)||^2 + lam ||A - A0||^2     (B fixed)
        B <- argmin ||(B A - T) M_in^1/2||^2 + lam ||B - B0||^2      (A fixed)

    with ``lam = prox``. ``iters = 0`` is the Jacobi step (A from B0 and B from A0, at once),
    which is the Riemannian / scaled-GD preconditioned LoRA step. With ``prox = 0`` the rounds
    are a block power iteration and ``B A`` tends to the truncated SVD of ``T``. No m x n matrix
    is ever formed; the half-steps are solved through a tall-skinny QR (backward stable), and a
    rank-deficient factor with ``prox = 0`` gives the least-squares solution nearest the start
    point (so ``B0 = 0`` leaves A at A0 and moves B).

    Args:
        terms: sequence of ``(U_i, V_i)`` pairs, 2-D tensors, ``U_i`` m x k_i, ``V_i`` k_i x n.
        coeffs: one real coefficient per term (Python numbers or one-element tensors).
        init: ``(B0, A0)``, m x r and r x n, same dtype; the start point and proximal anchor.
        iters: number of rounds, ``>= 0``.
        prox: proximal weight ``lam >= 0``.
        metric: optional ``(M_out, M_in)``; each ``None`` (identity), a positive vector
            (length m / n, a diagonal) or a symmetric positive definite matrix (m x m / n x n;
            asymmetry at rounding level is accepted, its lower triangle is used).
        precondition: optional per-term flags; a flagged term is ``M_out^-1 U_i V_i M_in^-1``.
            Requires ``metric``.
        start: ``"A"`` (A side first, the default) or ``"B"``.

    Returns:
        New tensors ``(B, A)`` in ``B0``'s dtype, on its device, without autograd history.
        Computation runs in float32 for float16/bfloat16/float32 input and in float64 when any
        input is float64. Inputs are never modified.

    Raises:
        ValueError: naming the argument, for shapes that do not chain, ranks that differ,
            empty dimensions, non-float dtypes, mixed devices, NaN/Inf values, a metric that is
            not positive (definite), a bad ``iters``/``prox``/``start``/``precondition``.
        FloatingPointError: when finite inputs give a result that overflows its dtype (e.g.
            float16 factors whose exact answer exceeds 65504); nothing is returned then.
    """
    if not isinstance(init, (tuple, list)) or len(init) != 2:
        raise ValueError("init must be a pair (B0, A0) of 2-D tensors")
    b0 = _check_2d(init[0], "init[0] (B0)", "m x r")
    a0 = _check_2d(init[1], "init[1] (A0)", "r x n")
    (m, r), (r2, n) = b0.shape, a0.shape
    if r != r2:
        raise ValueError(f"init: ranks differ: B0 is {m} x {r} but A0 is {r2} x {n}")
    if min(m, r, n) < 1:
        raise ValueError(f"init: B0 is {m} x {r} and A0 is {r2} x {n}; m, n and the rank r must all be at least 1")
    if b0.dtype != a0.dtype:
        raise ValueError(f"init: B0 is {b0.dtype} but A0 is {a0.dtype}; give both the same dtype")
    device = b0.device
    if a0.device != device:
        raise ValueError(f"init: B0 is on {device} but A0 is on {a0.device}")

    if not isinstance(terms, (tuple, list)) or len(terms) == 0:
        raise ValueError("terms must be a non-empty list of (U, V) pairs")
    terms = list(terms)
    for i, pair in enumerate(terms):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"terms[{i}] must be a pair (U, V) of 2-D tensors")
        u = _check_2d(pair[0], f"terms[{i}][0] (U)", "m x k")
        v = _check_2d(pair[1], f"terms[{i}][1] (V)", "k x n")
        if u.shape[0] != m:
            raise ValueError(f"terms[{i}][0] (U) has {u.shape[0]} rows but B0 has m = {m}")
        if v.shape[1] != n:
            raise ValueError(f"terms[{i}][1] (V) has {v.shape[1]} columns but A0 has n = {n}")
        if u.shape[1] != v.shape[0]:
            raise ValueError(f"terms[{i}]: U is {u.shape[0]} x {u.shape[1]} and V is {v.shape[0]} x {v.shape[1]}: "
                             "the inner dimensions do not chain")
        for j, t in enumerate((u, v)):
            if t.device != device:
                raise ValueError(f"terms[{i}][{j}] is on {t.device} but init is on {device}")

    if isinstance(coeffs, Tensor) and coeffs.dim() == 1:
        coeffs = list(coeffs)
    if not isinstance(coeffs, (tuple, list)) or len(coeffs) != len(terms):
        raise ValueError(f"coeffs must give one coefficient per term ({len(terms)}), "
                         f"got {len(coeffs) if isinstance(coeffs, (tuple, list)) else type(coeffs).__name__}")
    coeffs = [_check_real(c, f"coeffs[{i}]") for i, c in enumerate(coeffs)]

    try:
        iters_int = None if isinstance(iters, bool) else operator.index(iters)
    except TypeError:
        iters_int = None
    if iters_int is None or iters_int < 0:
        raise ValueError(f"iters must be an integer >= 0, got {iters!r}")
    prox = _check_real(prox, "prox", minimum=0.0)
    if start not in ("A", "B"):
        raise ValueError(f"start must be 'A' or 'B', got {start!r}")

    if metric is not None:
        if not isinstance(metric, (tuple, list)) or len(metric) != 2:
            raise ValueError("metric must be a pair (M_out, M_in); use None for an identity side")
        metric = (_check_metric_side(metric[0], "metric[0] (M_out)", m, "m", device),
                  _check_metric_side(metric[1], "metric[1] (M_in)", n, "n", device))
    if precondition is not None:
        if not isinstance(precondition, (tuple, list)) or len(precondition) != len(terms):
            raise ValueError(f"precondition must give one flag per term ({len(terms)})")
        if any(isinstance(f, Tensor) or f not in (True, False) for f in precondition):
            raise ValueError(f"precondition flags must be booleans, got {list(precondition)!r}")
        precondition = [bool(f) for f in precondition]
        if any(precondition) and (metric is None or all(side is None for side in metric)):
            raise ValueError("precondition flags a term but no metric is given")

    named = [("init[0] (B0)", b0), ("init[1] (A0)", a0)]
    for i, (u, v) in enumerate(terms):
        named += [(f"terms[{i}][0] (U)", u), (f"terms[{i}][1] (V)", v)]
    _check_finite(named)

    overflow = (f"lorsum: the result is not representable in {b0.dtype}: the inputs' scale overflows "
                "the computation (a target beyond float32 range, or factors that must grow past the "
                "start point's dtype); rescale the terms or pass float32/float64 factors")
    try:
        with torch.no_grad():
            b, a = reference.lorsum(terms, coeffs, (b0, a0), iters=iters_int, prox=prox, metric=metric,
                        precondition=precondition, start=start)
    except torch.linalg.LinAlgError as err:
        raise FloatingPointError(overflow) from err
    if not bool(torch.isfinite(b).all() & torch.isfinite(a).all()):
        raise FloatingPointError(overflow)
    return b, a
