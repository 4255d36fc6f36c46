"""A layer's captured rows folded into its dense gradient (:class:`Folded`), with the statistics
the optimizer needs; :class:`oplora.capture.sketch.Sketch` is its bounded-memory sibling (the same
interface)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import torch
from torch import Tensor

from . import rows as _rows

__all__ = ["Folded"]


@dataclass(eq=False)
class Folded:
    """Captured rows folded into the dense gradient: ``g = sum_j sD_j^T X_j`` (m x n, float32;
    float64 for float64 rows) and their number ``rows``; with the statistics the optimizer needs
    (``stats``): ``"diag"``, their column sums of squares ``sx`` (n,) and ``sg`` (m,) (diagonal
    K-FAC); ``"dense"``, the Grams ``gram_x = X^T X`` (n x n) and ``gram_g = sD^T sD`` (m x m).
    X may be dense or index rows (``oplora._rows``)."""

    g: Tensor
    rows: Union[int, Tensor] = 0
    sx: Optional[Tensor] = None
    sg: Optional[Tensor] = None
    gram_x: Optional[Tensor] = None
    gram_g: Optional[Tensor] = None

    @staticmethod
    def empty(m: int, n: int, dtype: torch.dtype, device: torch.device, stats: Optional[str]) -> "Folded":
        zeros = lambda *shape: torch.zeros(shape, dtype=dtype, device=device)  # noqa: E731
        if stats == "diag":
            return Folded(zeros(m, n), sx=zeros(n), sg=zeros(m))
        if stats == "dense":
            return Folded(zeros(m, n), gram_x=zeros(n, n), gram_g=zeros(m, m))
        return Folded(zeros(m, n))

    def add(self, x: Tensor, g: Tensor, live: Optional[Tensor] = None) -> None:
        """Fold the rows ``x`` (T x n, or T ids), ``g`` (T x m) in: one GEMM (an ``index_add``
        for ids; two more for dense statistics). ``live`` (T, bool, on the rows' device): the rows
        that carry gradient, the only ones counted in ``rows`` and X's statistics (the others add
        nothing to ``g``); ``rows`` is then a device tensor until :meth:`LoRASite.settle_rows`
        (no host synchronisation during backward)."""
        g = g.to(self.g.dtype)
        _rows.add_gt_x(self.g, g, x)
        self.rows = self.rows + (x.shape[0] if live is None else live.sum())
        if self.sx is not None:
            self.sx += _rows.col_sq(x, self.g.shape[1], self.g.dtype, live)
            self.sg += g.square().sum(0)
        if self.gram_x is not None:
            _rows.add_gram(self.gram_x, x, live)
            self.gram_g.addmm_(g.mT, g)

    def scale(self, c: float) -> None:
        """The rows' gradient multiplied by ``c`` in place: ``g`` by c, the gradient statistics
        (``sg``, ``gram_g``) by c^2; X's statistics unchanged."""
        self.g.mul_(c)
        for t in (self.sg, self.gram_g):
            if t is not None:
                t.mul_(c * c)

    def tensors(self) -> List[Tensor]:
        return [t for t in (self.g, self.sx, self.sg, self.gram_x, self.gram_g) if t is not None]

    # The products the guards, clipping and the step take of the folded gradient (the same for
    # ``oplora.sketch.Sketch``, whose gradient is low-rank).
    @property
    def device(self) -> torch.device:
        return self.g.device

    def factor_products(self, b: Tensor, a: Tensor) -> Tuple[Tensor, Tensor]:
        """``(G A^T, B^T G)`` with the layer's factors ``b`` (m x r), ``a`` (r x n), in their
        dtype: what autograd gives B and A (over ``s``)."""
        g = self.g.to(a.dtype)
        return g @ a.mT, b.mT @ g

    def rows_times(self, g: Tensor) -> Tensor:
        """``g G`` (T x n) for rows ``g`` (T x m), in G's dtype."""
        return g.to(self.g.dtype) @ self.g

    def sq_norm(self) -> Tensor:
        """``||G||_F^2`` (float64)."""
        return self.g.square().sum(dtype=torch.float64)
