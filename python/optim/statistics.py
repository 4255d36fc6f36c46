"""ScaledOPLoRA's statistics: the EMAs whose powers are the metric of its step (SPEC section 3).

Diagonal K-FAC (the default): ``d_in <- b2 d_in + (1 - b2) mean_t x_t^2`` (n) and
``d_out <- b2 d_out + (1 - b2) c sum_t g_t^2`` (m), ``g_t = s D_t``, ``c = T`` for a mean loss
(the per-example gradient scale), ``1/T`` for a summed one. Their sums of squares ride along the
step's first pass over the rows (``row_pass``), so :class:`KfacDiagRule` is a rule the step
engine evaluates; :func:`update_statistics` computes the other kinds up front from the rows
folded into the dense gradient (dense K-FAC Grams, Shampoo's ``G G^T`` / ``G^T G``). The metric is
``(d_hat + delta)^p`` (:func:`metric_from_statistics`), where

* ``d_hat = d / (1 - b2^t)`` at a layer's step t with ``bias_correction`` (the EMAs then start at
  zero, as Adam's second moment: the metric is this step's statistics at t = 1, their average
  since), else ``d_hat = d`` with the EMAs started at ``init_scale`` (the papers' choice, which
  keeps the start's scale for about ``1 / (1 - b2)`` steps);
* ``delta = damping`` (absolute, the papers' choice), or with ``relative_damping``
  ``damping * mean(d_hat)`` per layer and side (the trace / n for a dense statistic), so that the
  damping has the statistics' own scale whatever the layer's activation and gradient sizes.

Statistics are kept in float32 (float64 for float64 factors), uncorrected (the correction is
applied when the metric is formed, so that a checkpoint holds what Adam's would).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..capture import rows as _rows
from ..capture.sites import Folded
from . import engine

__all__ = ["StatsSpec", "KfacDiagRule", "update_statistics", "metric_from_statistics", "grad_blocks",
           "statistics_start", "bias_correction", "damping_of"]

Chunks = Sequence[Tuple[Tensor, Tensor]]


def grad_blocks(chunks: Chunks, dtype: torch.dtype, block: int = 256, n: Optional[int] = None
                ) -> Iterator[Tuple[int, Tensor]]:
    """The implicit gradient ``G = sum_j sD_j^T X_j`` (m x n) in blocks of ``block`` of its rows:
    ``(lo, G[lo:lo + block])``, never all of m x n at once (``block n`` memory). X_j may be index
    rows (``oplora.capture.rows``: token ids), whose width ``n`` must then be given."""
    m = chunks[0][1].shape[1]
    if not any(_rows.is_index(x) for x, _ in chunks):
        for lo in range(0, m, block):
            yield lo, sum((g[:, lo:lo + block].to(dtype).mT @ x.to(dtype) for x, g in chunks))
        return
    for lo in range(0, m, block):
        out = torch.zeros(min(block, m - lo), n, dtype=dtype, device=chunks[0][1].device)
        for x, g in chunks:
            _rows.add_gt_x(out, g[:, lo:lo + block], x)
        yield lo, out


def statistics_start(metric: str, init_scale: float, n: int, m: int, device: torch.device,
                     dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """``(d_in, d_out)`` before the first step: ``init_scale`` times ones (``metric="diag"``, n and
    m) or times the identity (``"dense"``, n x n and m x m)."""
    if metric == "diag":
        return (torch.full((n,), init_scale, dtype=dtype, device=device),
                torch.full((m,), init_scale, dtype=dtype, device=device))
    return init_scale * torch.eye(n, dtype=dtype, device=device), init_scale * torch.eye(m, dtype=dtype, device=device)


def _statistics_start(state: Dict, *, metric: str, init_scale: float, n: int, m: int, device: torch.device,
                      dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    if "d_in" in state:
        return state["d_in"], state["d_out"]
    return statistics_start(metric, init_scale, n, m, device, dtype)


def _out_scale(rows: int, loss_reduction: str, grad_coeff: float) -> float:
    """``c * grad_coeff^2``: c = T for a mean loss, 1/T for a summed one (SPEC section 3)."""
    return (float(rows) if loss_reduction == "mean" else 1.0 / rows) * grad_coeff**2


def _per_layer(values: Sequence[float], like: Tensor) -> Union[float, Tensor]:
    """One number per layer of a stack: a float when they are all equal, else a b x 1 tensor."""
    if all(v == values[0] for v in values):
        return float(values[0])
    return torch.tensor(values, dtype=torch.float64, device=like.device)[:, None]


def _scale(d: Tensor, dense: bool) -> Tensor:
    """The statistics' own scale, per layer: the mean of a diagonal (over its last dimension,
    kept) or the trace / n of a dense statistic; 1 where that is 0 (a side that never saw a
    non-zero value: its metric is then the damping itself, as an absolute one)."""
    mean = d.diagonal(dim1=-2, dim2=-1).mean(-1) if dense else d.mean(-1, keepdim=True)
    return torch.where(mean > 0, mean, torch.ones_like(mean))


def damping_of(d: Tensor, damping: float, relative: bool, dense: bool = False) -> Union[float, Tensor]:
    """The damping added to the statistics ``d`` before the power: ``damping``, or with
    ``relative`` ``damping`` times their scale (:func:`_scale`: per layer of a stack)."""
    return damping * _scale(d, dense) if relative else damping


def _diag_metric(d: Tensor, damping: float, power: float, relative: bool = False) -> Tensor:
    """``(d + delta)^power`` elementwise (a vector or a stack of them), ``delta`` from
    :func:`damping_of`; ones for ``power = 0``."""
    if power == 0.0:
        return torch.ones_like(d)
    return (d + damping_of(d, damping, relative)).pow(power)


def bias_correction(beta2: float, step: int) -> float:
    """``1 - beta2^step``: what an EMA started at zero must be divided by after ``step`` updates."""
    return 1.0 - beta2 ** step


@dataclass(frozen=True)
class StatsSpec:
    """Which statistics and how they are averaged: the EMA factor ``beta2``, ``metric`` ("diag" or
    "dense"), ``statistics`` ("kfac" or "shampoo"), ``loss_reduction`` ("mean": c = T, "sum":
    c = 1/T), ``init_scale``, the EMAs' start (``init_scale * ones``, or ``* I`` for dense), and
    ``bias_correction`` (the EMAs start at zero instead and the metric reads ``d / (1 - b2^t)``)."""

    beta2: float
    metric: str = "diag"
    statistics: str = "kfac"
    loss_reduction: str = "mean"
    init_scale: float = 1.0
    bias_correction: bool = False

    @property
    def start(self) -> float:
        """What the EMAs start at: 0 with bias correction, else ``init_scale``."""
        return 0.0 if self.bias_correction else self.init_scale


class KfacDiagRule(engine.StatsRule):
    """A layer's diagonal K-FAC statistics as the step engine's :class:`~oplora.optim.engine.StatsRule`:
    ``d_in <- b2 d_in + (1 - b2) sx / T`` and ``d_out <- b2 d_out + (1 - b2) c sg`` from the column
    sums of squares of the step's first pass over the rows, ``sx = sum_t x_t^2`` (n) and
    ``sg = sum_t g_t^2`` (m), and the metric ``((d_out_hat + delta)^p, (d_in_hat + delta)^p)``
    (none when ``p = 0``; ``d_hat`` and ``delta`` as in the module docstring, ``step`` the layer's
    step count t, this step included). :meth:`batch` evaluates the rules of a group's layers on
    stacks (per-layer ``T``, ``c`` and bias corrections as b x 1 tensors when they differ) and
    writes each layer's new EMAs (uncorrected) to its ``out["d_in"]``, ``out["d_out"]``.
    ``grad_coeff`` multiplies the captured sD (its statistics scale by its square); ``rows`` is T
    (of all ranks under data parallelism)."""

    def __init__(self, state: Dict, rows: int, out: Dict, spec: StatsSpec, *, dtype: torch.dtype, grad_coeff: float,
                 damping: float, power: float, relative_damping: bool = False, step: int = 1,
                 current_floor: bool = False):
        self.state, self.rows, self.out = state, rows, out
        self.out_scale = _out_scale(rows, spec.loss_reduction, grad_coeff)
        self.correction = bias_correction(spec.beta2, step) if spec.bias_correction else 1.0
        self.beta2, self.init_scale, self.dtype, self.damping, self.power = (spec.beta2, spec.start, dtype,
                                                                             damping, power)
        self.relative_damping, self.current_floor = relative_damping, current_floor
        self.key = (spec.beta2, spec.start, dtype, damping, power, relative_damping, current_floor)

    @staticmethod
    def batch(rules: Sequence["KfacDiagRule"], sx: Tensor, sg: Tensor
              ) -> Optional[Tuple[Optional[Tensor], Optional[Tensor]]]:
        first = rules[0]
        starts = [_statistics_start(rule.state, metric="diag", init_scale=first.init_scale, n=sx.shape[-1],
                                    m=sg.shape[-1], device=sx.device, dtype=first.dtype) for rule in rules]
        d_in, d_out = (engine.stack_layers([start[k] for start in starts]) for k in (0, 1))
        rows, out_scale, correction = (_per_layer([getattr(rule, name) for rule in rules], sx)
                                       for name in ("rows", "out_scale", "correction"))
        b2 = first.beta2
        # Per-layer T and c (float64 b x 1 tensors when they differ) must not promote the EMAs.
        new_in = (d_in * b2 + (1.0 - b2) * (sx.to(first.dtype) / rows)).to(first.dtype)
        new_out = (d_out * b2 + (1.0 - b2) * (sg.to(first.dtype) * out_scale)).to(first.dtype)
        for rule, d_in_i, d_out_i in zip(rules, new_in, new_out):
            rule.out["d_in"], rule.out["d_out"] = d_in_i, d_out_i
        if first.power == 0.0:
            return None
        if not (isinstance(correction, float) and correction == 1.0):
            new_in, new_out = (new_in / correction).to(first.dtype), (new_out / correction).to(first.dtype)
        if first.current_floor:  # never below this step's own statistics (a batch far off the average)
            new_in = torch.maximum(new_in, (sx.to(first.dtype) / rows).to(first.dtype))
            new_out = torch.maximum(new_out, (sg.to(first.dtype) * out_scale).to(first.dtype))
        return tuple(_diag_metric(d, first.damping, first.power, first.relative_damping) for d in (new_out, new_in))


def update_statistics(state: Dict, folded: Folded, spec: StatsSpec, *, grad_coeff: float = 1.0,
                      rows: Optional[int] = None, reduce: Optional[Callable[[List[Tensor]], None]] = None
                      ) -> Tuple[Tensor, Tensor]:
    """The EMAs ``d_in`` and ``d_out`` of ``state`` updated by this step's rows, all folded into
    ``folded`` (``oplora.capture.Folded``), as new tensors (``state`` is not modified), for every
    kind but diagonal K-FAC (:class:`KfacDiagRule`).

    ``spec`` (:class:`StatsSpec`) says which. ``statistics="kfac"``, ``metric="dense"``: the matrices ``X^T X / T`` (n x n) and
    ``c g^T g`` (m x m) (the fold's Grams). ``statistics="shampoo"``: the statistics of G itself,
    ``d_out`` from ``c G G^T`` and ``d_in`` from ``c G^T G`` (their diagonals, or the matrices
    with ``metric="dense"``), with the same ``c`` as the authors' code; Shampoo's own
    preconditioner ``L^-1/4 G R^-1/4`` is ``metric_power=0.25``. The EMAs start at
    ``init_scale * ones`` (``init_scale * I`` for dense); ``grad_coeff`` as in :class:`KfacDiagRule`.

    Data parallel (K-FAC only): ``rows`` is the row count of all ranks together (default: the
    local one) and ``reduce`` sums the local Grams over the ranks in place before they are
    scaled; the Shampoo statistics need G itself and take no ``reduce`` (ValueError).
    """
    rows = folded.rows if rows is None else rows
    g = folded.g
    m, n = g.shape
    d_in, d_out = _statistics_start(state, metric=spec.metric, init_scale=spec.start, n=n, m=m,
                                    device=g.device, dtype=g.dtype)
    out_scale = _out_scale(rows, spec.loss_reduction, grad_coeff)
    beta2 = spec.beta2
    if spec.statistics == "kfac":
        if spec.metric != "dense":
            raise ValueError("diagonal K-FAC statistics are summed in the step's first row pass (KfacDiagRule)")
        sum_in, sum_out = folded.gram_x.clone(), folded.gram_g.clone()
        if reduce is not None:
            reduce([sum_in, sum_out])
        new_in, new_out = sum_in / rows, sum_out * out_scale
    else:
        if reduce is not None:
            raise ValueError("the Shampoo statistics need the m x n gradient G itself; they cannot be "
                             "reduced over data-parallel ranks from thin products")
        if spec.metric == "diag":
            sq = g.square()
            new_out, new_in = sq.sum(1), sq.sum(0)
        else:
            new_out, new_in = g @ g.mT, g.mT @ g
        new_out, new_in = new_out * out_scale, new_in * out_scale
    return d_in * beta2 + (1.0 - beta2) * new_in, d_out * beta2 + (1.0 - beta2) * new_out


def metric_from_statistics(d: Tensor, damping: float, power: float, relative_damping: bool = False) -> Tensor:
    """``(d + delta)^power``: elementwise for a diagonal, by eigen-decomposition for a matrix;
    ``delta`` is ``damping``, or ``damping`` times the mean of ``d`` (the trace / n of a matrix)
    with ``relative_damping``. ``d`` is what the metric reads: the bias-corrected statistics when
    they are corrected.

    ``power = 0`` gives the identity metric (ones, or I) exactly.
    """
    if d.dim() == 1:
        return _diag_metric(d, damping, power, relative_damping)
    if power == 0.0:
        return torch.eye(d.shape[0], dtype=d.dtype, device=d.device)
    sym = 0.5 * (d + d.mT)
    delta = float(damping_of(sym, damping, relative_damping, dense=True))
    evals, evecs = torch.linalg.eigh(sym.double())
    # An EMA of Gram matrices is PSD; clamp the rounding-level negative eigenvalues.
    scaled = evecs * (evals.clamp_min(0.0) + delta).pow(power)
    out = scaled @ evecs.mT
    return (0.5 * (out + out.mT)).to(d.dtype)
