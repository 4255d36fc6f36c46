"""The step engine: the LoRSum problems of many layers, solved in lockstep passes over their rows.

An OPLoRA step of one layer is two LoRSum problems on the same captured rows (SPEC section 3):
the step ``(B, A)`` and the momentum update ``(Um, Vm)``; ScaledOPLoRA adds the K-FAC statistics
of those rows. Every half-step of every problem needs exactly one product of the layer's
implicit gradient ``G = sum_j G_j^T X_j`` (m x n, ``G_j = s D_j``) with a thin matrix -- ``G^T Q``
on the A side, ``G Q`` on the B side -- and otherwise only O((m + n) r^2) work on the factors.

So the engine advances all problems of all layers together. At each *pass* it gathers, per
layer, the right-hand sides of every problem's next half-step (and asks for the column sums of
squares of X and G on the layer's first pass when its metric comes from them), and reads each
layer's rows once for all of them through the backend's grouped ``row_pass``
(``oplora._backend``): one call for all layers. Passes per step, per layer:

* OPLoRA, ``iters = 1``: 2 (the step's and the momentum's A half-steps share pass 0, their
  B half-steps pass 1); ``iters = k``: 2k; ``iters = 0`` (Jacobi, both sides from the start): 1.
* ScaledOPLoRA, diagonal K-FAC: 3 -- the step's metric needs this step's statistics, so pass 0
  gathers them with the momentum's first half-step and the step runs one pass behind.

Between passes the backend's ``thin_qr`` factors the weighted fixed factor and ``prox_solve``
solves the r x r proximal least-squares problem. The math is ``oplora.reference.lorsum``'s,
half-step for half-step (same QR-based, rank-deficient-safe solve, same precision policy:
products in float32, float64 when anything is float64, the thin work in float64); only the
order of the floating-point sums differs.

Every product that crosses a pass boundary (``row_pass`` results) can be reduced by a hook
before it is used, which is how data-parallel training will keep replicas in lockstep.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..reference import Metric, compute_dtype

__all__ = ["STATS", "Problem", "Layer", "solve"]

#: ``Problem.metric = STATS``: the metric comes from this step's statistics (``Layer.metric_from_stats``).
STATS = "stats"

MetricSpec = Union[None, Tuple[Optional[Tensor], Optional[Tensor]], str]


@dataclass
class Problem:
    """One LoRSum problem on a layer's rows:
    ``(B, A) <- lorsum(thin + [(G, data_coeff)], init=init, iters, prox=lam, metric, start)``.

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


@dataclass
class Layer:
    """A layer's rows (``xs``: X_j T_j x n, ``gs``: G_j T_j x m) and the problems that read them.

    ``metric_from_stats(sx, sg)``, when given, receives ``sum_j colsum(X_j^2)`` (n) and
    ``sum_j colsum(G_j^2)`` (m) from the first pass and returns the ``(M_out, M_in)`` of the
    problems whose metric is :data:`STATS`.
    """

    xs: Sequence[Tensor]
    gs: Sequence[Tensor]
    problems: Sequence[Problem]
    metric_from_stats: Optional[Callable[[Tensor, Tensor], Tuple[Optional[Tensor], Optional[Tensor]]]] = None


@dataclass
class _Half:
    """A half-step waiting for its product: the QR of the weighted fixed factor and the
    right-hand side handed to ``row_pass``."""

    side: str  # "A" or "B"
    r_mat: Tensor
    q_plain: Tensor  # W^T Q (float64)
    q_prec: Optional[Tensor]  # W^-1 Q (float64), when a term is preconditioned
    rhs: Tensor  # the one handed to row_pass, in the compute dtype
    offset: int = 0  # its first column in the pass's qd (A) or qx (B)


@dataclass
class _Run:
    """A problem in flight: float64 iterates, its schedule of half-steps, its metric."""

    problem: Problem
    b0: Tensor
    a0: Tensor
    b: Tensor
    a: Tensor
    thin: List[Tuple[Tensor, Tensor, float, bool]]
    schedule: List[str]
    m_out: Optional[Metric] = None
    m_in: Optional[Metric] = None
    pos: int = 0
    halves: List[_Half] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.pos == len(self.schedule)

    @property
    def needs_prec(self) -> bool:
        return self.problem.data_precondition or any(t[3] for t in self.thin)


def _schedule(iters: int, start: str) -> List[str]:
    if iters == 0:
        return ["AB"]
    one = ["A", "B"] if start == "A" else ["B", "A"]
    return one * iters


class _LayerRun:
    def __init__(self, layer: Layer, ops):
        self.layer = layer
        factors = [t for p in layer.problems for t in p.init]
        self.dtype = compute_dtype(*factors, *layer.xs, *layer.gs)
        self.xs = [ops.rows(x, self.dtype) for x in layer.xs]
        self.gs = [ops.rows(g, self.dtype) for g in layer.gs]
        self.stats_done = layer.metric_from_stats is None
        self.runs = []
        for p in layer.problems:
            b0, a0 = p.init
            run = _Run(problem=p, b0=b0.double(), a0=a0.double(), b=b0.double(), a=a0.double(),
                       thin=[(u.to(self.dtype), v.to(self.dtype), float(c), bool(pre)) for u, v, c, pre in p.thin],
                       schedule=_schedule(p.iters, p.start))
            if p.metric != STATS:
                self._set_metric(run, p.metric)
            self.runs.append(run)

    @staticmethod
    def _set_metric(run: _Run, metric: MetricSpec) -> None:
        m_out, m_in = metric if metric is not None else (None, None)
        run.m_out, run.m_in = Metric(m_out), Metric(m_in)

    def ready(self, run: _Run) -> bool:
        return not run.done and run.m_out is not None


def _weighted_factor(run: _Run, side: str) -> Tensor:
    """``W F``: the fixed factor of ``run``'s next ``side`` half-step, weighted by its metric."""
    if side == "A":
        return run.m_out.weight(run.b)
    return run.m_in.weight(run.a.mT)


def _half(run: _Run, side: str, qmat: Tensor, r_mat: Tensor, dtype: torch.dtype) -> _Half:
    metric = run.m_out if side == "A" else run.m_in
    q_plain = metric.weight_t(qmat)
    q_prec = metric.unweight(qmat) if run.needs_prec else None
    rhs = (q_prec if run.problem.data_precondition else q_plain).to(dtype)
    return _Half(side, r_mat, q_plain, q_prec, rhs)


def _target(run: _Run, half: _Half, product: Tensor, dtype: torch.dtype) -> Tuple[Tensor, Tensor, Tensor, float, int]:
    """The half-step's proximal least-squares problem ``(R, Y, X0, lam, p)`` from ``product``
    (``G^T rhs`` for A, ``G rhs`` for B; q x k): ``Y = Q^T W T`` through the thin terms."""
    p = half.q_plain.shape[0]
    if half.side == "A":
        metric_q, x0 = run.m_in, run.a0
    else:
        metric_q, x0 = run.m_out, run.b0.mT
    y_plain = product.double().mT * run.problem.data_coeff
    y_prec = None
    if run.problem.data_precondition:
        y_plain, y_prec = torch.zeros_like(y_plain), y_plain
    for u, v, c, pre in run.thin:
        if c == 0.0:
            continue
        left, right = (u, v) if half.side == "A" else (v.mT, u.mT)
        small = (half.q_prec if pre else half.q_plain).to(dtype).mT @ left  # k x k_i
        # Scale the small factor (in float64) first, as the reference does, against overflow.
        term = ((small.double() * c).to(dtype) @ right).double()
        if pre:
            y_prec = term if y_prec is None else y_prec + term
        else:
            y_plain = y_plain + term
    y = y_plain if y_prec is None else y_plain + metric_q.solve_right(y_prec)
    return half.r_mat, y, x0, run.problem.lam, p


def solve(layers: Sequence[Layer], ops, reduce: Optional[Callable[[List[Tensor]], None]] = None
          ) -> List[List[Tuple[Tensor, Tensor]]]:
    """Solve every problem of every layer; returns, per layer, per problem, the new ``(B, A)`` in
    the dtype of the problem's ``init`` (new tensors; nothing is modified).

    ``ops``: the backend (``oplora._backend.ops_for(device)``). Per pass, each of its ops is
    called once for all layers: ``thin_qr`` on every half-step's weighted factor, ``row_pass`` on
    every layer's rows, ``prox_solve`` on every half-step's small problem. ``reduce`` (optional)
    is called with the list of every tensor a pass's ``row_pass`` produced (to reduce in place),
    before any of them is used.
    """
    runs = [_LayerRun(layer, ops) for layer in layers]
    while True:
        # 1. The half-steps every ready problem takes in this pass, and their QRs (one call).
        todo = [(lr_, run, side) for lr_ in runs for run in lr_.runs if lr_.ready(run)
                for side in run.schedule[run.pos]]
        factored = ops.thin_qr([_weighted_factor(run, side) for _, run, side in todo]) if todo else []
        for (lr_, run, side), (qmat, r_mat) in zip(todo, factored):
            run.halves.append(_half(run, side, qmat, r_mat, lr_.dtype))
        # 2. One row pass per layer that has anything to compute (one call for all layers).
        jobs, active = [], []
        for lr_ in runs:
            want_stats = not lr_.stats_done
            halves = [h for run in lr_.runs for h in run.halves]
            blocks = {}
            for side in ("A", "B"):
                offset = 0
                for h in halves:
                    if h.side == side:
                        h.offset = offset
                        offset += h.rhs.shape[1]
                chosen = [h.rhs for h in halves if h.side == side]
                blocks[side] = torch.cat(chosen, 1).contiguous() if chosen else None
            if not (halves or want_stats):
                continue
            jobs.append((lr_.xs, lr_.gs, blocks["A"], blocks["B"], want_stats))
            active.append(lr_)
        if not jobs:
            break
        results = ops.row_pass(jobs)
        if reduce is not None:
            reduce([t for res in results for t in res if t is not None])
        # 3. The statistics' metrics, then every half-step's small solve (one call).
        problems, owners = [], []
        for lr_, (px, pd, sx, sg) in zip(active, results):
            if not lr_.stats_done:
                metric = lr_.layer.metric_from_stats(sx, sg)
                lr_.stats_done = True
                for run in lr_.runs:
                    if run.problem.metric == STATS:
                        lr_._set_metric(run, metric)
            for run in lr_.runs:
                for half in run.halves:
                    product = px if half.side == "A" else pd
                    product = product[:, half.offset:half.offset + half.rhs.shape[1]]
                    problems.append(_target(run, half, product, lr_.dtype))
                    owners.append((run, half.side))
        for (run, side), x in zip(owners, ops.prox_solve(problems) if problems else []):
            if side == "A":
                run.a = x
            else:
                run.b = x.mT
        for lr_ in active:
            for run in lr_.runs:
                if run.halves:
                    run.halves = []
                    run.pos += 1
    out = []
    for lr_ in runs:
        res = []
        for run in lr_.runs:
            dt = run.problem.init[0].dtype
            res.append((run.b.to(dt).contiguous(), run.a.to(dt).contiguous()))
        out.append(res)
    return out
