"""What a backend provides: the :class:`Ops` of the optimizer step engine, and the torch ones.

A leaf module (it imports only torch and ``oplora.reference``): the backend adapters
(``oplora.backends.cpu_ops``, ``oplora.backends.triton_ops``) build their :class:`Ops` from it, and
``oplora.backends`` chooses among them. The ops, each specified by ``oplora.reference``:

* ``row_pass(jobs)``: for each job ``(xs, gs, qd, qx, stats)`` of one layer, the thin products
  ``G^T qd``, ``G qx`` of its implicit gradient and its diagonal K-FAC statistics, reading the
  rows once (``reference.row_pass``); one call for all layers of a step;
* ``rows(t, dtype)``: the captured rows as ``row_pass`` takes them, for compute dtype ``dtype``
  (the precision policy of ``oplora.backends``);
* ``thin_qr(Zs)`` and ``prox_solve(problems)``: the float64 r-sized work of the half-steps, one
  call for all half-steps of a pass (``reference.thin_qr``, ``reference.prox_solve`` per item;
  an item is a matrix or a stack of same-shaped matrices, one per layer of a group);
* ``live_rows(g)``: the rows of a captured ``sD`` (T x m) that carry gradient, a bool mask (T,) on
  its device, without a host synchronisation (``g.any(1)``; the capture calls it in backward).

:data:`TORCH_OPS` is the ``torch`` backend: the reference itself, item by item, on every device.
"""

from __future__ import annotations

from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import reference

__all__ = ["Ops", "Job", "PassResult", "SmallProblem", "TORCH_OPS"]

#: One layer's row pass: ``(xs, gs, qd, qx, stats)``, the arguments of ``reference.row_pass``.
Job = Tuple[Sequence[Tensor], Sequence[Tensor], Optional[Tensor], Optional[Tensor], bool]
#: ``(px, pd, sx, sg)``, the result of ``reference.row_pass`` (None where not asked for).
PassResult = Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor]]
#: ``(R, Y, X0, lam, p)``, the arguments of ``reference.prox_solve``.
SmallProblem = Tuple[Tensor, Tensor, Tensor, float, int]


class Ops(NamedTuple):
    """The ops of one backend (see the module docstring)."""

    name: str
    rows: Callable[[Tensor, torch.dtype], Tensor]
    row_pass: Callable[[Sequence[Job]], List[PassResult]]
    thin_qr: Callable[[Sequence[Tensor]], List[Tuple[Tensor, Tensor]]]
    prox_solve: Callable[[Sequence[SmallProblem]], List[Tensor]]
    live_rows: Callable[[Tensor], Tensor]


def _torch_rows(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t.to(dtype)


def live_rows(g: Tensor) -> Tensor:
    """The rows of ``g`` (T x m) with a nonzero: ``g.any(1)`` (``any`` reads a float as ``!= 0``:
    NaN counts, -0.0 does not), one pass over ``g``, no host synchronisation."""
    return g.any(1)


TORCH_OPS = Ops(
    name="torch",
    rows=_torch_rows,
    row_pass=lambda jobs: [reference.row_pass(*job) for job in jobs],
    thin_qr=lambda zs: [reference.thin_qr(z) for z in zs],
    prox_solve=lambda problems: [reference.prox_solve(*p) for p in problems],
    live_rows=live_rows,
)
