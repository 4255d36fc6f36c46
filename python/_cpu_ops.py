"""The C++ CPU backend (``oplora._cpu``, built from ``csrc/``) as step-engine :class:`Ops`.

Importing this module imports the extension; ``oplora._backend`` catches the ``ImportError`` and
reports why. Tensors reach C++ as zero-copy NumPy views (``tensor.numpy()``); outputs are
allocated here with torch and written in place by C++. The thread count follows
``torch.get_num_threads()``, so ``torch.set_num_threads`` governs both backends alike.

bf16/fp16 rows are upcast to float32 once per step in :func:`rows` (the policy stated in
``oplora._backend``); C++ takes float32 and float64 only.

The r-sized solves run in C++ up to rank ``LAPACK_FROM - 1``: there its unblocked Householder QR
and Jacobi SVD beat the call overhead of torch's LAPACK ops; from rank ``LAPACK_FROM`` on
(r = 64 at m = 2048: 5 ms per QR and 6 ms per solve in C++, see bench/results/cpu_step.md) the
blocked LAPACK routines of ``oplora.reference`` are faster, and take over.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
from torch import Tensor

from . import _cpu  # noqa: F401  (ImportError here: the extension is missing)
from . import reference
from ._backend import Job, Ops, PassResult, SmallProblem

__all__ = ["OPS", "describe", "LAPACK_FROM"]

#: rank from which thin_qr and prox_solve use the reference (LAPACK) instead of C++.
LAPACK_FROM = 48


def describe() -> str:
    return (f"C++ extension oplora._cpu ({_cpu.__file__}), OpenMP {'on' if _cpu.openmp else 'off'}; "
            "runs CPU tensors")


def _np(t: Tensor):
    return t.detach().numpy()


def rows(t: Tensor, dtype: torch.dtype) -> Tensor:
    """Captured rows as C++ takes them: ``dtype`` (float32/float64), C-contiguous. A copy only when
    the dtype or layout differs (bf16/fp16 rows, or a non-contiguous view)."""
    return t.to(dtype).contiguous()


def row_pass(jobs: Sequence[Job]) -> List[PassResult]:
    threads = torch.get_num_threads()
    out = []
    for xs, gs, qd, qx, stats in jobs:
        n, m = xs[0].shape[1], gs[0].shape[1]
        dtype = xs[0].dtype
        px = torch.empty(n, qd.shape[1], dtype=dtype) if qd is not None else None
        pd = torch.empty(m, qx.shape[1], dtype=dtype) if qx is not None else None
        sx = torch.empty(n, dtype=dtype) if stats else None
        sg = torch.empty(m, dtype=dtype) if stats else None
        arrays = [None if t is None else _np(t) for t in (qd, qx, px, pd, sx, sg)]
        _cpu.row_pass([_np(x) for x in xs], [_np(g) for g in gs], *arrays, threads=threads)
        out.append((px, pd, sx, sg))
    return out


def thin_qr(zs: Sequence[Tensor]) -> List[Tuple[Tensor, Tensor]]:
    """``reference.thin_qr`` of every ``Z`` (p x r, or a stack b x p x r), in C++ below rank
    ``LAPACK_FROM`` (matrix by matrix, into one output stack)."""
    out = []
    for z in zs:
        if z.shape[-1] >= LAPACK_FROM:
            out.append(reference.thin_qr(z))
            continue
        z = z.contiguous()
        p, r = z.shape[-2:]
        k = min(p, r)
        q = torch.empty(*z.shape[:-2], p, k, dtype=torch.float64)
        rm = torch.empty(*z.shape[:-2], k, r, dtype=torch.float64)
        for zi, qi, ri in zip(z.view(-1, p, r), q.view(-1, p, k), rm.view(-1, k, r)):
            _cpu.thin_qr(_np(zi), _np(qi), _np(ri))
        out.append((q, rm))
    return out


def prox_solve(problems: Sequence[SmallProblem]) -> List[Tensor]:
    """``reference.prox_solve`` of every ``(R, Y, X0, lam, p)`` (matrices or stacks of them, with
    ``lam`` and ``p`` numbers), in C++ below rank ``LAPACK_FROM``."""
    out = []
    for r_mat, y, x0, lam, p in problems:
        if r_mat.shape[-1] >= LAPACK_FROM:
            out.append(reference.prox_solve(r_mat, y, x0, lam, p))
            continue
        k, r = r_mat.shape[-2:]
        q = y.shape[-1]
        x = torch.empty(*r_mat.shape[:-2], r, q, dtype=torch.float64)
        for ri, yi, x0i, xi in zip(r_mat.contiguous().view(-1, k, r), y.contiguous().view(-1, k, q),
                                   x0.contiguous().view(-1, r, q), x.view(-1, r, q)):
            _cpu.prox_solve(_np(ri), _np(yi), _np(x0i), float(lam), int(p), _np(xi))
        out.append(x)
    return out


OPS = Ops(name="cpp", rows=rows, row_pass=row_pass, thin_qr=thin_qr, prox_solve=prox_solve)
