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
(``oplora.backends``): one call for all layers. Passes per step, per layer:

* OPLoRA, ``iters = 1``: 2 (the step's and the momentum's A half-steps share pass 0, their
  B half-steps pass 1); ``iters = k``: 2k; ``iters = 0`` (Jacobi, both sides from the start): 1.
* ScaledOPLoRA, diagonal K-FAC: 3 -- the step's metric needs this step's statistics, so pass 0
  gathers them with the momentum's first half-step and the step runs one pass behind.

Between passes the backend's ``thin_qr`` factors the weighted fixed factor and ``prox_solve``
solves the r x r proximal least-squares problem. A half-step is ``oplora.reference``'s own:
the engine calls its stages (``half_operators``, ``half_rhs``) and the backend's versions of
``thin_qr`` and ``prox_solve``, with the product of the rows from ``row_pass`` in between (same
precision policy: products in float32, float64 when anything is float64, the thin work in
float64); only the order of the floating-point sums in the row products differs, and a problem's
start point that is another problem's term (the momentum ``(Um, Vm)`` in the step) is taken in
float64 there too, as a problem's own start is (``reference.half_rhs``: a float64 term is computed
in float64).

Groups: the r-sized work between passes is a dozen small tensor ops per half-step (weighting by
the metric, the thin terms' products, the right-hand sides). Done layer by layer that is
thousands of kernel launches per step on a 7B model (224 layers), each a few microseconds on a
GPU. So layers whose problems have the same structure -- shapes, dtypes, coefficients, metric
kinds, schedule (:func:`_signature`) -- form a *group* whose iterates are stacked (b x m x r):
every r-sized op, ``thin_qr`` and ``prox_solve`` then runs once per group, and a model-wide step
costs the same number of launches whatever its number of layers (the transformer blocks of a
model share a handful of shapes). Only ``row_pass`` still sees one job per layer -- its rows are
separate tensors -- and takes them all in one grouped call. A layer whose signature no other
layer shares is a group of one: the same code on stacks of one (views, no copies).

Every product that crosses a pass boundary (``row_pass`` results) can be reduced by a hook
before it is used, which is how data-parallel training keeps replicas in lockstep.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import reference
from ..capture import rows as _rows
from .._checks import first_nonfinite, group_by
from ..reference import Metric, compute_dtype
from .problems import STATS, Layer, MetricSpec, NonFiniteProducts, Problem, StatsRule

__all__ = ["STATS", "MetricSpec", "Problem", "Layer", "StatsRule", "NonFiniteProducts", "solve", "stack_layers"]

def stack_layers(ts: Sequence[Tensor]) -> Tensor:
    """``torch.stack(ts)``; a view for a single tensor (a group of one copies nothing)."""
    return ts[0].unsqueeze(0) if len(ts) == 1 else torch.stack(list(ts))


@dataclass
class _Half:
    """A half-step waiting for its product: the QR of the weighted fixed factor and the
    right-hand side handed to ``row_pass`` (stacks over the group's layers)."""

    side: str  # "A" or "B"
    r_mat: Tensor
    q_plain: Tensor  # W^T Q (float64)
    q_prec: Optional[Tensor]  # W^-1 Q (float64), when a term is preconditioned
    rhs: Tensor  # the one handed to row_pass, in the compute dtype
    offset: int = 0  # its first column in the pass's qd (A) or qx (B)


@dataclass
class _Run:
    """A problem of every layer of a group in flight: stacked float64 iterates (b x m x r,
    b x r x n), stacked thin terms, the schedule of half-steps, the stacked metric."""

    problem: Problem  # the first layer's: the group shares everything but the tensors
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


def _shape(t: Optional[Tensor]) -> Any:
    return None if t is None else (tuple(t.shape), t.dtype)


def _signature(layer: Layer, dtype: torch.dtype) -> Hashable:
    """What layers must share to be stacked into one group: every shape and dtype, every
    coefficient, which terms are which problem's start, the metric kinds, the schedule, the
    statistics rule. The tensors' values (and the rows, which ``row_pass`` reads per layer) may
    differ."""
    problems = []
    for p in layer.problems:
        metric = p.metric if p.metric is None or isinstance(p.metric, str) else tuple(map(_shape, p.metric))
        problems.append((tuple(map(_shape, p.init)), tuple((_shape(u), _shape(v), float(c), bool(pre),
                                                            _start_of(layer.problems, p, i))
                                                           for i, (u, v, c, pre) in enumerate(p.thin)),
                         float(p.data_coeff), bool(p.data_precondition), metric, float(p.lam), int(p.iters),
                         p.start, float(p.lam_relative)))
    stats = None if layer.stats is None else (type(layer.stats), layer.stats.key)
    b, a = layer.problems[0].init
    return (b.device, dtype, a.shape[1], b.shape[0], stats, tuple(problems))


def _start_of(problems: Sequence[Problem], problem: Problem, i: int) -> Optional[int]:
    """Which of ``problems`` (a layer's, ``problem`` among them) has thin term ``i`` of ``problem``
    as its start point (the same tensors), or None."""
    u, v = problem.thin[i][:2]
    return next((k for k, other in enumerate(problems) if u is other.init[0] and v is other.init[1]), None)


class _Group:
    """Layers of one signature: their rows (per layer) and their problems' runs (stacked)."""

    def __init__(self, layers: Sequence[Layer], dtype: torch.dtype, ops):
        self.layers = layers
        self.dtype = dtype
        self.xs = [[x if _rows.is_index(x) else ops.rows(x, dtype) for x in layer.xs]
                   for layer in layers]
        # Index rows (Embedding LoRA: token ids) are read by torch ops, not by the backend's row_pass.
        self.indexed = [any(_rows.is_index(x) for x in layer.xs) for layer in layers]
        self.gs = [[ops.rows(g, dtype) for g in layer.gs] for layer in layers]
        self.dense = [None if layer.dense is None else layer.dense.to(dtype) for layer in layers]
        self.low_rank = [None if layer.low_rank is None else tuple(t.to(dtype) for t in layer.low_rank)
                         for layer in layers]
        self.stats_done = layers[0].stats is None
        self.runs = []
        starts = [(stack_layers([layer.problems[j].init[0] for layer in layers]).double(),
                   stack_layers([layer.problems[j].init[1] for layer in layers]).double())
                  for j in range(len(layers[0].problems))]
        for j, p in enumerate(layers[0].problems):
            b0, a0 = starts[j]
            # A problem's start as a term -- its own (the step's (B, A)) or another problem's (the
            # momentum's (Um, Vm) in the step) -- is the float64 stack already made for that start
            # (reference.half_rhs computes a float64 term in float64): a step of a few ulps of the
            # factors survives its rounding, and the stacks are made once.
            thin = []
            for i, (_, _, c, pre) in enumerate(p.thin):
                k = _start_of(layers[0].problems, p, i)
                if k is not None:
                    thin.append((*starts[k], float(c), bool(pre)))
                else:
                    thin.append((stack_layers([layer.problems[j].thin[i][0] for layer in layers]).to(dtype),
                                 stack_layers([layer.problems[j].thin[i][1] for layer in layers]).to(dtype),
                                 float(c), bool(pre)))
            run = _Run(problem=p, b0=b0, a0=a0, b=b0, a=a0, thin=thin, schedule=_schedule(p.iters, p.start))
            if p.metric != STATS:
                metric = p.metric if p.metric is not None else (None, None)
                stacked = [None if metric[k] is None
                           else stack_layers([layer.problems[j].metric[k] for layer in layers]) for k in (0, 1)]
                self._set_metric(run, stacked)
            self.runs.append(run)

    @staticmethod
    def _set_metric(run: _Run, metric: Optional[Sequence[Optional[Tensor]]]) -> None:
        m_out, m_in = metric if metric is not None else (None, None)
        run.m_out, run.m_in = Metric(m_out, batched=True), Metric(m_in, batched=True)

    def ready(self, run: _Run) -> bool:
        return not run.done and run.m_out is not None

    def take_stats(self, sx: Tensor, sg: Tensor) -> None:
        """The metric of the :data:`STATS` problems from the first pass's sums (stacks)."""
        rules = [layer.stats for layer in self.layers]
        metric = type(rules[0]).batch(rules, sx, sg)
        self.stats_done = True
        for run in self.runs:
            if run.problem.metric == STATS:
                self._set_metric(run, metric)


def _weighted_factor(run: _Run, side: str) -> Tensor:
    """``W F``: the fixed factor of ``run``'s next ``side`` half-step, weighted by its metric."""
    if side == "A":
        return run.m_out.weight(run.b)
    return run.m_in.weight(run.a.mT)


def _half(run: _Run, side: str, qmat: Tensor, r_mat: Tensor, dtype: torch.dtype) -> _Half:
    metric = run.m_out if side == "A" else run.m_in
    q_plain, q_prec = reference.half_operators(metric, qmat, run.needs_prec)
    rhs = (q_prec if run.problem.data_precondition else q_plain).to(dtype)
    return _Half(side, r_mat, q_plain, q_prec, rhs)


def _target(run: _Run, half: _Half, product: Tensor, dtype: torch.dtype) -> Tuple[Tensor, Tensor, Tensor, float, int]:
    """The half-step's proximal least-squares problems ``(R, Y, X0, lam, p)`` (stacks) from
    ``product`` (``G^T rhs`` for A, ``G rhs`` for B; b x q x k): ``Y`` by the reference's
    :func:`~oplora.reference.half_rhs`, the data term's part being the product."""
    if half.side == "A":
        metric_q, x0 = run.m_in, run.a0
        terms = run.thin
    else:
        metric_q, x0 = run.m_out, run.b0.mT
        terms = [(v.mT, u.mT, c, pre) for u, v, c, pre in run.thin]
    data = product.double().mT * run.problem.data_coeff
    known = (None, data) if run.problem.data_precondition else (data, None)
    y = reference.half_rhs(half.q_plain, half.q_prec, terms, metric_q, dtype, known)
    lam = run.problem.lam
    if run.problem.lam_relative:
        # ||R||_F^2 = ||W F||_F^2: the fixed factor's scale, per layer of the stack (b,).
        lam = lam + run.problem.lam_relative * half.r_mat.square().sum((-2, -1)) / x0.shape[-2]
    return half.r_mat, y, x0, lam, half.q_plain.shape[-2]


def _groups(layers: Sequence[Layer], ops) -> Tuple[List[_Group], List[Tuple[int, int]]]:
    """The groups of ``layers`` (by :func:`_signature`) and where each layer went:
    ``(group, index in group)``."""
    dtypes = [compute_dtype(*(t for p in layer.problems for t in p.init), *layer.xs, *layer.gs, layer.dense,
                            *(layer.low_rank or ()))
              for layer in layers]
    members = group_by(range(len(layers)), lambda i: _signature(layers[i], dtypes[i]))
    groups, where = [], [(0, 0)] * len(layers)
    for index in members.values():
        for pos, i in enumerate(index):
            where[i] = (len(groups), pos)
        groups.append(_Group([layers[i] for i in index], dtypes[index[0]], ops))
    return groups, where


def _zero_products(grp: "_Group", qd: Optional[Tensor], qx: Optional[Tensor], stats: bool) -> List[Optional[Tensor]]:
    """Zero products of a layer without rows (all folded into its dense part)."""
    b0, a0 = grp.runs[0].b0, grp.runs[0].a0  # stacks: b x m x r, b x r x n
    m, n = b0.shape[-2], a0.shape[-1]
    kind = dict(dtype=grp.dtype, device=b0.device)
    return [None if qd is None else torch.zeros(n, qd.shape[1], **kind),
            None if qx is None else torch.zeros(m, qx.shape[1], **kind),
            torch.zeros(n, **kind) if stats else None, torch.zeros(m, **kind) if stats else None]


def _products(jobs: Sequence[Tuple["_Group", int, Optional[Tensor], Optional[Tensor], bool]], ops
              ) -> List[Tuple[Optional[Tensor], ...]]:
    """The pass's products ``(G^T qd, G qx, sx, sg)`` of each job ``(group, layer index, qd, qx,
    stats)``: the rows' part by one ``row_pass`` call for every layer that has dense rows (index
    rows by ``oplora.capture.rows.row_pass``: gathers and index_add), plus the folded part by matrix
    products (torch's GEMM: MKL on the CPU, cuBLAS on CUDA) and its sums."""
    with_rows = [(grp.xs[i], grp.gs[i], qd, qx, stats) for grp, i, qd, qx, stats in jobs
                 if grp.xs[i] and not grp.indexed[i]]
    from_rows = iter(ops.row_pass(with_rows) if with_rows else [])
    out = []
    for grp, i, qd, qx, stats in jobs:
        dense, low, sums = grp.dense[i], grp.low_rank[i], grp.layers[i].dense_sums
        if grp.indexed[i]:
            parts = list(_rows.row_pass(grp.xs[i], grp.gs[i], qd, qx, stats, grp.runs[0].a0.shape[-1]))
        else:
            parts = list(next(from_rows)) if grp.xs[i] else _zero_products(grp, qd, qx, stats)
        if dense is not None:
            if qd is not None:
                parts[0] = parts[0].addmm_(dense.mT, qd)
            if qx is not None:
                parts[1] = parts[1].addmm_(dense, qx)
        if low is not None:  # G = P R
            p, r = low
            if qd is not None:
                parts[0] = parts[0].addmm_(r.mT, p.mT @ qd)
            if qx is not None:
                parts[1] = parts[1].addmm_(p, r @ qx)
        if stats and sums is not None:  # the folded or sketched rows' (less the rows without gradient)
            parts[2], parts[3] = parts[2] + sums[0].to(grp.dtype), parts[3] + sums[1].to(grp.dtype)
        out.append(tuple(parts))
    return out


def solve(layers: Sequence[Layer], ops, reduce: Optional[Callable[[List[Tensor]], None]] = None
          ) -> List[List[Tuple[Tensor, Tensor]]]:
    """Solve every problem of every layer; returns, per layer, per problem, the new ``(B, A)`` in
    the dtype of the problem's ``init`` (new tensors, possibly views of one buffer per group;
    nothing is modified).

    ``ops``: the backend (``oplora.backends.ops_for(device)``). Per pass, each of its ops is
    called once for all layers: ``thin_qr`` on every half-step's weighted factors, ``row_pass`` on
    every layer's rows, ``prox_solve`` on every half-step's small problems (the r-sized ops on
    stacks, one per group and half-step). ``reduce`` (optional) is called with the list of every
    tensor a pass's ``row_pass`` produced (to reduce in place), before any of them is used.
    Raises :class:`NonFiniteProducts` naming the layer when a pass's products (after the reduction)
    hold NaN or Inf.
    """
    groups, where = _groups(layers, ops)
    while True:
        # 1. The half-steps every ready problem takes in this pass, and their QRs (one call).
        todo = [(grp, run, side) for grp in groups for run in grp.runs if grp.ready(run)
                for side in run.schedule[run.pos]]
        factored = ops.thin_qr([_weighted_factor(run, side) for _, run, side in todo]) if todo else []
        for (grp, run, side), (qmat, r_mat) in zip(todo, factored):
            run.halves.append(_half(run, side, qmat, r_mat, grp.dtype))
        # 2. One row pass per layer that has anything to compute (one call for all layers).
        jobs, active = [], []
        for grp in groups:
            want_stats = not grp.stats_done
            halves = [h for run in grp.runs for h in run.halves]
            if not (halves or want_stats):
                continue
            blocks = {}
            for side in ("A", "B"):
                offset = 0
                for h in halves:
                    if h.side == side:
                        h.offset = offset
                        offset += h.rhs.shape[-1]
                chosen = [h.rhs for h in halves if h.side == side]
                blocks[side] = torch.cat(chosen, -1).contiguous() if chosen else None
            for i in range(len(grp.layers)):
                qd, qx = (None if blocks[s] is None else blocks[s][i] for s in ("A", "B"))
                jobs.append((grp, i, qd, qx, want_stats))
            active.append(grp)
        if not jobs:
            break
        results = _products(jobs, ops)
        if reduce is not None:
            reduce([t for res in results for t in res if t is not None])
        stacked, start = [], 0
        for grp in active:
            mine = results[start:start + len(grp.layers)]
            start += len(grp.layers)
            stacked.append([None if mine[0][k] is None else stack_layers([res[k] for res in mine]) for k in range(4)])
        # A NaN or Inf in a layer's rows shows in its products: checked here, on the thin results
        # (a group's stacks at once), instead of reading every row once more before the step
        # (nothing is written yet); the layer is looked for only when there is one.
        if first_nonfinite([t for stacks in stacked for t in stacks if t is not None]) is not None:
            flat = [(k, t) for k, res in enumerate(results) for t in res if t is not None]
            grp, pos = jobs[flat[first_nonfinite([t for _, t in flat])][0]][:2]
            raise NonFiniteProducts(where.index((groups.index(grp), pos)))
        # 3. The statistics' metrics, then every half-step's small solves (one call).
        problems, owners = [], []
        for grp, (px, pd, sx, sg) in zip(active, stacked):
            if not grp.stats_done:
                grp.take_stats(sx, sg)
            for run in grp.runs:
                for half in run.halves:
                    product = px if half.side == "A" else pd
                    product = product[..., half.offset:half.offset + half.rhs.shape[-1]]
                    problems.append(_target(run, half, product, grp.dtype))
                    owners.append((run, half.side))
        for (run, side), x in zip(owners, ops.prox_solve(problems) if problems else []):
            if side == "A":
                run.a = x
            else:
                run.b = x.mT
        for grp in active:
            for run in grp.runs:
                if run.halves:
                    run.halves = []
                    run.pos += 1
    solved = []
    for grp in groups:
        per_run = []
        for run in grp.runs:
            dt = run.problem.init[0].dtype
            per_run.append((run.b.to(dt).contiguous(), run.a.to(dt).contiguous()))
        solved.append(per_run)
    return [[(b[pos], a[pos]) for b, a in solved[g]] for g, pos in where]
