"""The Triton backend's step-engine ops (``oplora.backends.ops.Ops``), from ``oplora_kernels``.

``oplora.backends`` imports this module (and with it Triton) only when a CUDA tensor first needs
it, or when this backend is asked for by name; an ``ImportError`` here (Triton not installed)
makes the backend unavailable with that reason. Importing it touches no GPU: the kernels compile
at their first launch.

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
  (``oplora.backends.cholqr``, plain torch).
* ``prox_solve(problems)``: the batched ``reference.prox_solve`` (one SVD per stack), with the
  stacks of one shape -- the step's and the momentum's half-steps of a group -- concatenated
  into one call.

The kernels run on CUDA tensors; ``oplora.backends`` dispatches only those here. The same ops
accept CPU tensors under ``TRITON_INTERPRET=1`` (how the tests exercise them without a GPU).
"""

from __future__ import annotations

from typing import List, Sequence

import torch
import triton
from torch import Tensor

from oplora_kernels import row_pass as _row_pass

from .. import reference
from . import cholqr as _cholqr
from .._checks import group_by
from .ops import TORCH_OPS, Job, Ops, PassResult, SmallProblem

__all__ = ["OPS", "describe", "rows", "row_pass", "prox_solve"]


def rows(t: Tensor, dtype: torch.dtype) -> Tensor:
    """Captured rows ``t`` (T x width) as :func:`row_pass` takes them for compute dtype ``dtype``
    (see the module docstring): ``t`` itself when the kernel can read it, else a copy."""
    if dtype == torch.float32 and t.dtype in _row_pass.ROW_DTYPES and (t.numel() == 0 or t.stride(-1) == 1):
        return t
    return t.to(dtype).contiguous()


def row_pass(jobs: Sequence[Job], **launch) -> List[PassResult]:
    """``reference.row_pass(*job)`` for every job ``(xs, gs, qd, qx, stats)``: the float64 ones
    by the reference, all others in one grouped kernel call (see the module docstring).
    ``launch``: options of ``oplora_kernels.row_pass.row_pass`` (``block_t``, ``block_c``,
    ``precision``); the step engine passes none."""
    results: List = [None] * len(jobs)
    fast, fast_index = [], []
    for i, job in enumerate(jobs):
        xs, gs, qd, qx, _ = job
        if any(t.dtype == torch.float64 for t in (*xs, *gs, qd, qx) if t is not None):
            results[i] = reference.row_pass(*job)
        else:
            fast.append(job)
            fast_index.append(i)
    for i, res in zip(fast_index, _row_pass.row_pass(fast, **launch)):
        results[i] = res
    return results


def prox_solve(problems: Sequence[SmallProblem]) -> List[Tensor]:
    """``reference.prox_solve`` of every ``(R, Y, X0, lam, p)`` (matrices or stacks), the
    problems of one shape and device solved in one batched call (their ``lam`` and ``p`` as
    per-matrix tensors)."""
    out: List = [None] * len(problems)
    groups = group_by(problems, lambda prob: (tuple(prob[0].shape[-2:]), tuple(prob[1].shape[-2:]), prob[0].device))
    for index in groups.values():
        if len(index) == 1:
            out[index[0]] = reference.prox_solve(*problems[index[0]])
            continue
        stacks = [[t if t.dim() == 3 else t.unsqueeze(0) for t in problems[i][:3]] for i in index]
        sizes = [s[0].shape[0] for s in stacks]
        device = stacks[0][0].device
        # lam (a number, or one per matrix of a stack: a relative prox) and p, one value per matrix.
        per = [torch.cat([torch.as_tensor(problems[i][j], dtype=torch.float64, device=device).reshape(-1)
                          .expand(size) for i, size in zip(index, sizes)]) for j in (3, 4)]
        x = reference.prox_solve(*(torch.cat([s[j] for s in stacks]) for j in range(3)), *per)
        for i, part in zip(index, x.split(sizes)):
            out[i] = part if problems[i][0].dim() == 3 else part[0]
    return out


def describe() -> str:
    """Why the Triton backend is (or is not yet) usable on this machine, without touching CUDA."""
    base = f"Triton {triton.__version__} kernels (oplora_kernels); CUDA tensors"
    if _row_pass.interpreting():
        return base + "; TRITON_INTERPRET=1: kernels run through the CPU interpreter (tests only, slow)"
    if not torch.cuda.is_available():
        return base + "; installed, but torch sees no CUDA device here, so nothing is dispatched to it"
    return base


OPS = Ops(name="triton", rows=rows, row_pass=row_pass, thin_qr=_cholqr.thin_qr, prox_solve=prox_solve,
          live_rows=TORCH_OPS.live_rows)
