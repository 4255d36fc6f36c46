"""What the step engine (:mod:`oplora.optim.engine`) is given: a layer's gradient as rows, folded
or sketched (:class:`Layer`), the LoRSum problems that read it (:class:`Problem`), and how a
metric follows from the rows' statistics (:class:`StatsRule`). Re-exported by ``engine``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Optional, Sequence, Tuple, Union

from torch import Tensor

__all__ = ["STATS", "MetricSpec", "Problem", "Layer", "StatsRule", "NonFiniteProducts"]

#: ``Problem.metric = STATS``: the metric comes from this step's statistics (``Layer.stats``).
STATS = "stats"

MetricSpec = Union[None, Tuple[Optional[Tensor], Optional[Tensor]], str]


@dataclass
class Problem:
    """One LoRSum problem on a layer's rows:
    ``(B, A) <- lorsum(thin + [(G, data_coeff)], init=init, iters, prox=lam, metric, start)``.

    ``lam_relative``: a proximal weight relative to the fixed factor's own scale, added to
    ``lam``: each half-step's weight is ``lam + lam_relative * ||W F||_F^2 / r`` (F the fixed
    factor, W its metric weight: the mean squared singular value of ``W F``), so that it neither
    freezes a small factor nor vanishes beside a large one.

    ``thin``: small terms ``(U, V, c, precondition)`` (U m x k, V k x n); the data term is the
    layer's ``G`` with coefficient ``data_coeff``, preconditioned when ``data_precondition``.
    ``metric``: None, ``(M_out, M_in)`` (vectors or SPD matrices, either may be None) or
    :data:`STATS`.
    """

    init: Tuple[Tensor, Tensor]
    thin: Sequence[Tuple[Tensor, Tensor, float, bool]]
    data_coeff: float
    data_precondition: bool = False
    metric: MetricSpec = None
    lam: float = 0.0
    iters: int = 1
    start: str = "A"
    lam_relative: float = 0.0


class StatsRule:
    """How a layer's metric follows from the column sums of squares of its rows (the diagonal
    K-FAC statistics), evaluated for a whole group of layers at once.

    ``key``: hashable; layers whose rules have equal ``key`` (and type) may share a group.
    ``batch(rules, sx, sg)`` (a static method) receives the rules of a group's layers and the
    stacks ``sx = sum_j colsum(X_j^2)`` (b x n) and ``sg = sum_j colsum(G_j^2)`` (b x m) from
    their first pass, and returns the stacks ``(M_out, M_in)`` (b x m, b x n; either may be
    None) of the problems whose metric is :data:`STATS`, or None for no metric. It may record
    what it computed in the rules (the optimizer's new statistics).
    """

    key: Hashable = None

    @staticmethod
    def batch(rules: Sequence["StatsRule"], sx: Tensor, sg: Tensor
              ) -> Optional[Tuple[Optional[Tensor], Optional[Tensor]]]:
        raise NotImplementedError


@dataclass
class Layer:
    """A layer's gradient ``G = dense + sum_j G_j^T X_j`` and the problems that read it.

    ``xs``: X_j (T_j x n; or T_j token ids standing for one-hot rows, ``oplora.capture.rows``) and
    ``gs``: G_j (T_j x m), the rows (possibly none); ``dense``: the rows
    already folded into an m x n matrix (``oplora.capture``), or None; ``low_rank``: ``(P, R)``,
    the rows sketched into a low-rank gradient ``P R`` (``oplora.capture.sketch``), or None; with
    ``dense_sums`` the folded or sketched rows' column sums of squares ``(sum x^2 (n), sum g^2 (m))``. ``stats``, when given, turns the first
    pass's column sums of squares (rows and folded together) into the metric of the problems
    whose metric is :data:`STATS` (see :class:`StatsRule`).
    """

    xs: Sequence[Tensor]
    gs: Sequence[Tensor]
    problems: Sequence[Problem]
    stats: Optional[StatsRule] = None
    dense: Optional[Tensor] = None
    dense_sums: Optional[Tuple[Tensor, Tensor]] = None
    low_rank: Optional[Tuple[Tensor, Tensor]] = None


class NonFiniteProducts(FloatingPointError):
    """A pass's products of layer ``index`` (in the order given to :func:`solve`) hold NaN or Inf:
    its rows or folded gradient do (or, under data parallelism, another rank's)."""

    def __init__(self, index: int):
        super().__init__(f"the gradient products of layer {index} hold NaN or Inf")
        self.index = index
