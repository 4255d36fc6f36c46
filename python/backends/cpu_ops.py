"""The C++ CPU backend (``oplora._cpu``, built from ``csrc/``) as step-engine :class:`Ops`.

Importing this module imports the extension; ``oplora.backends`` imports it with ``oplora`` (the
extension is small), catches the ``ImportError`` and reports why. Tensors reach C++ as zero-copy
NumPy views (``tensor.numpy()``); outputs are allocated here with torch and written in place by
C++. The thread count follows ``torch.get_num_threads()``, so ``torch.set_num_threads`` governs
both backends alike.

bf16/fp16 rows are upcast to float32 once per step in :func:`rows` (the policy stated in
``oplora.backends``); C++ takes float32 and float64 only.

The r-sized float64 work (``thin_qr``, ``prox_solve``) is the reference's (LAPACK through torch):
the step engine hands it over as stacks of same-shaped layers, on which LAPACK was measured
faster than the C++ Householder QR and Jacobi SVD this backend used to carry (see csrc/README.md).
"""

from __future__ import annotations

from typing import List, Sequence

import torch
from torch import Tensor

from .. import _cpu  # noqa: F401  (ImportError here: the extension is missing)
from .ops import TORCH_OPS, Job, Ops, PassResult, live_rows as _torch_live_rows

__all__ = ["OPS", "describe"]


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
    """Every job in one ``_cpu.row_pass_many`` call per compute dtype (one OpenMP team over the row
    blocks of all layers: a team per layer costs more than a small layer's arithmetic)."""
    threads = torch.get_num_threads()
    out, calls = [], {}
    for xs, gs, qd, qx, stats in jobs:
        n, m = xs[0].shape[1], gs[0].shape[1]
        dtype = xs[0].dtype
        px = torch.empty(n, qd.shape[1], dtype=dtype) if qd is not None else None
        pd = torch.empty(m, qx.shape[1], dtype=dtype) if qx is not None else None
        sx = torch.empty(n, dtype=dtype) if stats else None
        sg = torch.empty(m, dtype=dtype) if stats else None
        arrays = [None if t is None else _np(t) for t in (qd, qx, px, pd, sx, sg)]
        calls.setdefault(dtype, []).append(([_np(x) for x in xs], [_np(g) for g in gs], *arrays))
        out.append((px, pd, sx, sg))
    for group in calls.values():
        _cpu.row_pass_many(group, threads=threads)
    return out


def live_rows(g: Tensor) -> Tensor:
    """``ops.live_rows`` by ``_cpu.live_rows``: each row read only up to its first nonzero (for a
    row with gradient, its first element), where ``g.any(1)`` converts and reads all of ``g``
    (SmolLM2's q, k, v, o at 512 tokens: about 50 ms of a 1.9 s backward). float32/float64
    contiguous rows; others (bf16, strided) by torch."""
    if g.dtype not in (torch.float32, torch.float64) or not g.is_contiguous() or g.dim() != 2:
        return _torch_live_rows(g)
    live = torch.empty(g.shape[0], dtype=torch.uint8)
    _cpu.live_rows(_np(g), live.numpy())
    return live.view(torch.bool)


OPS = Ops(name="cpp", rows=rows, row_pass=row_pass, thin_qr=TORCH_OPS.thin_qr, prox_solve=TORCH_OPS.prox_solve,
          live_rows=live_rows)
