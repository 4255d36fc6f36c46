"""A layer's gradient in memory that does not grow with tokens: a two-sided sketch taken as rows arrive.

With ``capture_budget=`` (``oplora.capture.Capture``) a layer whose rows no longer fit keeps, in
place of its rows or its dense m x n gradient ``G = sum_j sD_j^T X_j``, a single-pass sketch of it
(Tropp, Yurtsever, Udell and Cevher, "Practical sketching algorithms for low-rank matrix
approximation", SIAM J. Matrix Anal. Appl. 2017, section 4):

* the range sketch ``Y = G Om`` (m x (r + k)), ``Om = [A0^T, Om_r]``: the layer's own ``A0^T`` and
  k Gaussian columns;
* the co-range sketch ``W = Psi^T G`` ((r + l) x n), ``Psi = [B0, Psi_r]``: the layer's own ``B0``
  and l Gaussian columns (``l = 2 k + 1``);

each a GEMM per chunk of rows (``Y += sD^T (X Om)``, ``W += (sD Psi)^T X``), with the diagonal
K-FAC sums and the row count kept exactly as the dense fold keeps them. The Gaussian parts are
regenerated from a seed at every chunk, never stored. Memory: ``(r + k) m + (r + l) n`` numbers
per layer, whatever the number of tokens.

At the step the sketch becomes a low-rank gradient ``G^ = P R`` (:meth:`Sketch.low_rank`):
``Q = orth(Y)``, ``X^ = (Psi^T Q)^+ W``, ``G^ = Q X^`` (exact when G has rank <= r + k), then
corrected so that the products with the layer's own factors are G's exactly:
``G^' = G^ + B0 (B0^T B0)^+ (B0^T G - B0^T G^)``. So ``G^' A0^T = G A0^T`` and
``B0^T G^' = B0^T G`` -- the gradients autograd gives B and A, and the first half-step's whole
right-hand side -- and what is approximated is G on the directions the factors do not span yet.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple, Union

import torch
from torch import Tensor

from . import rows as _rows

__all__ = ["Sketch", "sketch_sizes", "sketch_numbers"]


def sketch_sizes(rank: int, k: int) -> Tuple[int, int]:
    """The range and co-range widths ``(r + k, r + 2 k + 1)`` of a rank-``rank`` layer's sketch."""
    return rank + k, rank + 2 * k + 1


def sketch_numbers(m: int, n: int, rank: int, k: int, stats: Optional[str] = "diag") -> int:
    """Numbers a sketched m x n layer holds (range and co-range sketches, and its K-FAC sums)."""
    wide, tall = sketch_sizes(rank, k)
    return wide * m + tall * n + ((m + n) if stats == "diag" else 0)


@dataclass(eq=False)
class Sketch:
    """The sketch of one layer's gradient (module docstring): ``y`` (m x (r + k)), ``w``
    ((r + l) x n), ``rows``, and with ``stats == "diag"`` the column sums of squares ``sx`` (n)
    and ``sg`` (m), all in ``dtype`` (float32; float64 for float64 rows). ``b0`` and ``a0`` are the
    layer's factors as matrices (m x r, r x n: views of the parameters, not copies), read at every
    chunk and at the step: they do not change in between. Same interface as
    :class:`oplora.capture.folded.Folded` (``add``, ``scale``, ``tensors``, ``rows``, ``sx``, ``sg``)."""

    b0: Tensor
    a0: Tensor
    k: int
    seed: int
    y: Tensor
    w: Tensor
    rows: Union[int, Tensor] = 0
    sx: Optional[Tensor] = None
    sg: Optional[Tensor] = None
    chunks: int = field(default=0, repr=False)
    _cache: Optional[tuple] = field(default=None, repr=False)

    @staticmethod
    def empty(b0: Tensor, a0: Tensor, k: int, seed: int, dtype: torch.dtype, stats: Optional[str]) -> "Sketch":
        if stats not in (None, "diag"):
            raise ValueError(f"a sketched gradient keeps the diagonal K-FAC sums only, not stats={stats!r}")
        (m, r), n = b0.shape, a0.shape[1]
        wide, tall = sketch_sizes(r, k)
        zeros = lambda *shape: torch.zeros(shape, dtype=dtype, device=b0.device)  # noqa: E731
        out = Sketch(b0, a0, k, seed, zeros(m, wide), zeros(tall, n))
        if stats == "diag":
            out.sx, out.sg = zeros(n), zeros(m)
        return out

    @property
    def dtype(self) -> torch.dtype:
        return self.y.dtype

    def _gaussian(self, rows: int, cols: int, salt: int) -> Tensor:
        gen = torch.Generator(device=self.y.device)
        gen.manual_seed((self.seed * 2 + salt) % (2**63 - 1))
        return torch.randn(rows, cols, generator=gen, dtype=self.dtype, device=self.y.device)

    def omega(self) -> Tensor:
        """``Om = [A0^T, Om_r]`` (n x (r + k))."""
        n = self.a0.shape[1]
        return torch.cat([self.a0.detach().mT.to(self.dtype), self._gaussian(n, self.k, 0)], dim=1)

    def psi(self) -> Tensor:
        """``Psi = [B0, Psi_r]`` (m x (r + 2 k + 1))."""
        m = self.b0.shape[0]
        return torch.cat([self.b0.detach().to(self.dtype), self._gaussian(m, 2 * self.k + 1, 1)], dim=1)

    def add(self, x: Tensor, g: Tensor, live: Optional[Tensor] = None) -> None:
        """Sketch the rows ``x`` (T x n, or T ids), ``g`` (T x m): ``Y += g^T (x Om)``,
        ``W += (g Psi)^T x``, and the K-FAC sums; ``live`` as in :meth:`oplora.capture.folded.Folded.add`."""
        g = g.to(self.dtype)
        n = self.a0.shape[1]
        self.y.addmm_(g.mT, _rows.x_times(_rows.to(x, self.dtype), self.omega()))
        self.w += _rows.xt_times(_rows.to(x, self.dtype), g @ self.psi(), n).mT
        self.rows = self.rows + (x.shape[0] if live is None else live.sum())
        self.chunks += 1
        if self.sx is not None:
            self.sx += _rows.col_sq(x, n, self.dtype, live)
            self.sg += g.square().sum(0)

    def scale(self, c: float) -> None:
        """The gradient multiplied by ``c``: the sketches by c, ``sg`` by c^2."""
        self.y.mul_(c)
        self.w.mul_(c)
        if self.sg is not None:
            self.sg.mul_(c * c)

    def tensors(self) -> List[Tensor]:
        return [t for t in (self.y, self.w, self.sx, self.sg) if t is not None]

    @property
    def device(self) -> torch.device:
        return self.y.device

    def times(self, v: Tensor) -> Tensor:
        """``G^ v`` for ``v`` (n x k), in ``v``'s dtype (exact for ``v = A0^T``)."""
        p, r = self.low_rank(v.dtype)
        return p @ (r @ v)

    def t_times(self, u: Tensor) -> Tensor:
        """``u^T G^`` for ``u`` (m x k), in ``u``'s dtype (exact for ``u = B0``)."""
        p, r = self.low_rank(u.dtype)
        return (u.mT @ p) @ r

    def factor_products(self, b: Tensor, a: Tensor) -> Tuple[Tensor, Tensor]:
        """``(G A0^T, B0^T G)``, exactly: the sketches' own first columns and rows (``b`` and
        ``a`` must be the factors the sketch was taken with)."""
        r = self.b0.shape[1]
        return self.y[:, :r], self.w[:r]

    def rows_times(self, g: Tensor) -> Tensor:
        """``g G^`` (T x n) for rows ``g`` (T x m), in the sketch's dtype."""
        p, r = self.low_rank()
        return (g.to(p.dtype) @ p) @ r

    def sq_norm(self) -> Tensor:
        """``||G^||_F^2`` (float64) of the sketched gradient: ``trace(P^T P R R^T)``."""
        p, r = (t.to(torch.float64) for t in self.low_rank())
        return ((p.mT @ p) * (r @ r.mT)).sum()

    def low_rank(self, dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, Tensor]:
        """``(P, R)``, m x c and c x n with ``c <= 2 r + k``, such that ``P R`` is the sketched
        gradient, exact on the layer's own factors (module docstring); computed in float64 when
        the sketch is, else float32, and returned in ``dtype`` (default: the sketch's)."""
        out = dtype or self.dtype
        key = (self.chunks, self.y._version, self.w._version, self.b0._version, self.a0._version)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self._reconstruct())
        p, rr = self._cache[1]
        return p.to(out), rr.to(out)

    def _reconstruct(self) -> Tuple[Tensor, Tensor]:
        work = torch.float64 if self.dtype == torch.float64 else torch.float32
        y, w = self.y.to(work), self.w.to(work)
        b0 = self.b0.detach().to(work)
        r = b0.shape[1]
        q, _ = torch.linalg.qr(y)
        core = self.psi().to(work).mT @ q                       # (r + l) x (r + k)
        x_hat = torch.linalg.pinv(core) @ w                    # (r + k) x n
        # B0 (B0^T B0)^+ (zero while B0 = 0, PEFT's start: nothing to correct then)
        bp = b0 @ torch.linalg.pinv(b0.mT @ b0, hermitian=True)
        p = torch.cat([q, bp], dim=1)
        rr = torch.cat([x_hat, w[:r] - (b0.mT @ q) @ x_hat], dim=0)  # w[:r] = B0^T G, exact
        return p, rr
