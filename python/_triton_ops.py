"""The Triton backend's step-engine ops (``oplora._backend.Ops``), from ``oplora_kernels``.

``oplora._backend._load_triton`` imports this module; an ``ImportError`` here (Triton not
installed) makes the backend unavailable with that reason. Importing it touches no GPU: the
kernels compile at their first launch.

* ``row_pass(jobs)``: every float16/bfloat16/float32 job of the call goes through the grouped
  fused kernel (``oplora_kernels.row_pass``: rows read in their own dtype, float32
  accumulation, a handful of launches for all layers). Float64 jobs (the engine's compute dtype
  when anything is float64) go to ``oplora.reference.row_pass``: a float64 tensor-core path is
  not worth a kernel for what is a debugging/reference precision.
* ``rows(t, dtype)``: the rows as the kernel reads them -- ``t`` itself (no copy, no upcast)
  when the compute dtype is float32 and ``t`` is float16/bfloat16/float32 with unit column
  stride; a contiguous copy in the compute dtype otherwise (float64 compute, other dtypes,
  column-strided views). Rows are only read, so a copy loses nothing.
* ``thin_qr(Zs)``: batched CholeskyQR2 per shape with a Householder fallback
  (``oplora_kernels.thin_qr``).
* ``prox_solve(problems)``: batched SVD solves per shape (``oplora_kernels.prox_solve``), the
  reference's formula and rank cutoff.

The kernels run on CUDA tensors; ``oplora._backend`` dispatches only those here. The same ops
accept CPU tensors under ``TRITON_INTERPRET=1`` (how the tests exercise them without a GPU).
"""

from __future__ import annotations

from typing import List, Sequence

import torch
import triton
from torch import Tensor

from oplora_kernels import prox_solve as _prox_solve
from oplora_kernels import row_pass as _row_pass
from oplora_kernels import thin_qr as _thin_qr

from . import reference
from ._backend import Ops  # defined before _backend imports this module

__all__ = ["OPS", "describe", "rows", "row_pass"]


def rows(t: Tensor, dtype: torch.dtype) -> Tensor:
    """Captured rows ``t`` (T x width) as :func:`row_pass` takes them for compute dtype ``dtype``
    (see the module docstring): ``t`` itself when the kernel can read it, else a copy."""
    if dtype == torch.float32 and t.dtype in _row_pass.ROW_DTYPES and (t.numel() == 0 or t.stride(-1) == 1):
        return t
    return t.to(dtype).contiguous()


def row_pass(jobs: Sequence) -> List:
    """``reference.row_pass(*job)`` for every job ``(xs, gs, qd, qx, stats)``: the float64 ones
    by the reference, all others in one grouped kernel call (see the module docstring)."""
    results: List = [None] * len(jobs)
    fast, fast_index = [], []
    for i, job in enumerate(jobs):
        xs, gs, qd, qx, _ = job
        if any(t.dtype == torch.float64 for t in (*xs, *gs, qd, qx) if t is not None):
            results[i] = reference.row_pass(*job)
        else:
            fast.append(job)
            fast_index.append(i)
    for i, res in zip(fast_index, _row_pass.row_pass(fast)):
        results[i] = res
    return results


def describe() -> str:
    """Why the Triton backend is (or is not yet) usable on this machine, without touching CUDA."""
    base = f"Triton {triton.__version__} kernels (oplora_kernels); CUDA tensors"
    if _row_pass.interpreting():
        return base + "; TRITON_INTERPRET=1: kernels run through the CPU interpreter (tests only, slow)"
    if not torch.cuda.is_available():
        return base + "; installed, but torch sees no CUDA device here, so nothing is dispatched to it"
    return base


OPS = Ops(name="triton", rows=rows, row_pass=row_pass, thin_qr=_thin_qr.thin_qr, prox_solve=_prox_solve.prox_solve)
