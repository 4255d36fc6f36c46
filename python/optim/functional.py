"""The functional core of the optimizers: one LoRA layer's update from its captured X and sD.

Every optimizer class is a thin shell over these functions (SPEC section 3). Inputs are the
layer's factors ``B`` (m x r) and ``A`` (r x n), its captured ``chunks`` (pairs
``(X_j, sD_j)``, X_j T_j x n, sD_j T_j x m; together the batch of T rows), its state dict and the
step's :class:`StepContext`; the output is a :class:`Plan` -- the layer's LoRSum problems for the
step engine (``oplora.optim.engine``) and how their solutions become an :class:`Update` (new
factors, new state entries). Nothing is modified until :func:`commit`.

The implicit gradient ``G = s D^T X = sum_j sD_j^T X_j`` (m x n) enters LoRSum as the engine's
data term: gradient accumulation is handled without concatenating rows, and no m x n matrix is
formed (SVDLoRA, the explicit baseline, excepted).

Precision: LoRSum computes in float32 (float64 when the factors are float64); state tensors are
stored in the factors' dtype except the K-FAC statistics, which are kept in float32 (float64 for
float64 factors), as Adam keeps its moments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import backends as _backend
from .._checks import group_by
from ..reference import compute_dtype
from ..capture.sites import Folded
from ..capture.sketch import Sketch
from . import engine
from . import statistics as _stats
from .statistics import KfacDiagRule, StatsSpec, metric_from_statistics, update_statistics

__all__ = ["StepContext", "Update", "Plan", "commit", "run_plans", "init_momentum", "plan_oplora",
           "plan_scaled_oplora", "plan_svd", "riemannian_precondition"]

Chunks = Sequence[Tuple[Tensor, Tensor]]
Reduce = Callable[[List[Tensor]], None]


@dataclass(frozen=True)
class StepContext:
    """What one ``step()`` hands down to the layers' updates (never kept on the optimizer).

    ``grad_coeff``: the multiplier of the captured sD -- 1 / GradScaler's loss scale x the clip
    coefficient x 1 / the number of data-parallel ranks. ``rows``: per layer index, the row count
    of all ranks together (data parallel; empty otherwise). ``reduce``: sums a list of tensors
    over the ranks in place (None: one process).
    """

    grad_coeff: float = 1.0
    rows: Dict[int, int] = field(default_factory=dict)
    reduce: Optional[Reduce] = None


class Update(NamedTuple):
    """A layer's computed step: new factors and the state entries to write. The update functions
    modify nothing, so that the optimizer commits all layers only once every solve succeeded."""

    b: Tensor
    a: Tensor
    state: Dict[str, object]


def commit(targets: Sequence[Tuple[Update, Tensor, Tensor, Dict]]) -> None:
    """Write every ``(update, B, A, state)``: the new factors into ``B`` and ``A``, each new state
    tensor into the existing state tensor of that name when shapes, dtypes and devices agree (in
    place, as torch optimizers keep their state), the other entries by assignment.

    The copies go through ``torch._foreach_copy_``, a few launches for all layers. A new state
    tensor that is a view of a larger buffer (the engine solves layers in stacks) is stored as
    its own copy, so that no state tensor keeps another layer's memory alive.
    """
    dst: List[Tensor] = []
    src: List[Tensor] = []
    for update, b, a, state in targets:
        dst += [b, a]
        src += [update.b, update.a]
        for name, value in update.state.items():
            old = state.get(name)
            if (isinstance(value, Tensor) and isinstance(old, Tensor) and old is not value
                    and old.shape == value.shape and old.dtype == value.dtype and old.device == value.device):
                dst.append(old)
                src.append(value)
                continue
            if isinstance(value, Tensor) and value.untyped_storage().nbytes() != value.nbytes:
                value = value.clone()
            state[name] = value
    for index in group_by(range(len(dst)), lambda i: (dst[i].device, dst[i].dtype, src[i].dtype)).values():
        d_list, s_list = [dst[i] for i in index], [src[i] for i in index]
        if hasattr(torch, "_foreach_copy_"):
            torch._foreach_copy_(d_list, s_list)
        else:  # torch < 2.2
            for d, s_ in zip(d_list, s_list):
                d.copy_(s_)


def init_momentum(b: Tensor, a: Tensor, rank: int, seed: int) -> Tuple[Tensor, Tensor]:
    """Momentum start: ``Um = 0`` (m x k) and ``Vm`` (k x n) Gaussian with entries N(0, 1/n).

    The rows of Vm are then nearly orthonormal (``Vm Vm^T ~ I_k``), so the first momentum update
    is one power-iteration sketch of G: ``Um = G Vm^T (Vm Vm^T + lam I)^-1``. Vm is drawn on the
    CPU from a generator seeded with ``seed``, so the start is the same on every device and a
    resumed run (which keeps the seed) is bit-exact.
    """
    m, n = b.shape[0], a.shape[1]
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    vm = torch.randn(rank, n, generator=gen, dtype=torch.float64) / math.sqrt(n)
    return torch.zeros(m, rank, dtype=b.dtype, device=b.device), vm.to(device=a.device, dtype=a.dtype)


def _start_side(start: str, b: Tensor, first: bool) -> str:
    """The side a LoRSum problem whose start is ``(b, ...)`` takes first: ``start``, or for
    ``"auto"`` ``"B"`` at a layer's first step when ``b`` is exactly zero, else ``"A"`` (from
    ``B = 0`` the A half-step cannot move A: its least-squares problem is empty)."""
    if start != "auto":
        return start
    return "B" if first and not bool(b.any()) else "A"


class Plan(NamedTuple):
    """A layer's step as engine problems (``layer``) and how to turn their solutions into the
    layer's :class:`Update` (``finish``). ``layer`` is None for an update that needs no engine
    (SVDLoRA's explicit one): ``finish`` then receives no solutions."""

    layer: Optional[engine.Layer]
    finish: Callable[[List[Tuple[Tensor, Tensor]]], Update]
    device: torch.device


def run_plans(plans: Sequence[Plan], reduce: Optional[Reduce] = None) -> List[Update]:
    """Solve the plans of many layers together, one engine run per device (``oplora.backends``
    picks the ops), and return their updates in order. ``reduce`` (data parallel) is handed to
    :func:`oplora.optim.engine.solve`: it receives every tensor of each row pass (thin products,
    diagonal K-FAC sums) to reduce in place before they are used. Raises
    :class:`oplora.optim.engine.NonFiniteProducts` with the index of the plan whose layer's
    products hold NaN or Inf."""
    updates: List[Optional[Update]] = [None] * len(plans)
    solving = [i for i, plan in enumerate(plans) if plan.layer is not None]
    for positions in group_by(solving, lambda i: plans[i].device).values():
        index = [solving[k] for k in positions]
        try:
            solved = engine.solve([plans[i].layer for i in index], _backend.ops_for(plans[index[0]].device), reduce)
        except engine.NonFiniteProducts as err:
            raise engine.NonFiniteProducts(index[err.index]) from None
        for i, sol in zip(index, solved):
            updates[i] = plans[i].finish(sol)
    for i, plan in enumerate(plans):
        if plan.layer is None:
            updates[i] = plan.finish([])
    return updates  # type: ignore[return-value]


def plan_oplora(
    b: Tensor,
    a: Tensor,
    chunks: Chunks,
    state: Dict,
    *,
    lr: float,
    momentum: float,
    dampening: float,
    iters: int,
    prox: float,
    start: str,
    momentum_rank: int,
    seed: int,
    metric: engine.MetricSpec = None,
    stats: Optional[engine.StatsRule] = None,
    grad_coeff: float = 1.0,
    extra_state: Optional[Dict] = None,
    folded: Optional[Folded] = None,
    step_scale: float = 1.0,
    relative_prox: bool = False,
    precondition_momentum: bool = False,
    row_sums_offset: Optional[Tensor] = None,
) -> Plan:
    """One OPLoRA step of a layer (SPEC section 3) as a :class:`Plan`:

    1. ``(B, A) <- lorsum([(B, A), (sD^T, X), (Um, Vm)], [1, -lr (1 - dampening), -lr momentum],
       init=(B, A), iters, prox=lr*prox)``; with ``metric=(M_out, M_in)`` the gradient and momentum
       terms are preconditioned (``M_out^-1 T_i M_in^-1``), the ScaledOPLoRA step.
    2. ``(Um, Vm) <- lorsum([(Um, Vm), (sD^T, X)], [momentum, 1 - dampening], init=(Um, Vm),
       iters, prox=lr*prox)``, never with a metric. Skipped altogether when ``momentum == 0``.

    Both use the momentum of before the step; they run together in the step engine, sharing every
    pass over X and sD. ``state`` keys: ``step`` (int), ``momentum_U`` (m x k), ``momentum_V``
    (k x n), created at the first step (:func:`init_momentum`). ``grad_coeff`` multiplies G
    (:class:`StepContext`). ``metric`` may be :data:`oplora.optim.engine.STATS` with a ``stats``
    rule (the ScaledOPLoRA step, whose metric comes from this step's rows). ``extra_state`` is read
    when the plan finishes (the statistics rule fills it during the solve). ``folded``: the rows
    already folded into the dense gradient (``oplora.capture.Folded``), added to ``chunks``'s.
    ``step_scale`` multiplies the step's gradient and momentum coefficients (not the momentum
    update): ScaledOPLoRA's bias correction of its averaged momentum, ``1 / (1 - b1^t)``.

    ``relative_prox``: the proximal weight of each half-step is ``prox`` times the mean squared
    singular value of its (weighted) fixed factor instead of ``lr * prox``
    (:class:`oplora.optim.engine.Problem`'s ``lam_relative``). ``start="auto"``: each problem takes
    its B half-step first at the layer's first step when its start ``B`` is exactly zero (PEFT's
    init; the momentum's ``Um = 0``), so that both factors move at once; ``"A"`` otherwise. That
    is one host sync per layer at its first step only.

    ``precondition_momentum`` (with a ``metric``): the momentum averages the preconditioned
    gradients, ``(Um, Vm) <- lorsum([(Um, Vm), (sD^T, X)], [momentum, 1 - dampening],
    metric, precondition=[False, True])`` -- Adafactor's momentum of updates -- and enters the
    step as it is, instead of averaging raw gradients that the step's metric preconditions: a
    gradient far off the average is normalised by the metric of its own step, not by later ones.

    ``row_sums_offset`` (n,): the column sums of squares of held X rows without gradient (left in
    ``chunks`` by the capture's settle), taken off this step's statistics (``stats``).
    """
    lam, lam_relative = (0.0, prox) if relative_prox else (lr * prox, 0.0)
    first = state.get("step", 0) == 0
    use_momentum = momentum != 0.0
    if use_momentum:
        if "momentum_U" in state:
            um, vm = state["momentum_U"], state["momentum_V"]
        else:
            um, vm = init_momentum(b, a, momentum_rank, seed)
    pre = metric is not None
    averaged = pre and precondition_momentum  # the momentum holds preconditioned gradients
    thin = [(b, a, 1.0, False)]
    if use_momentum:
        thin.append((um, vm, -lr * momentum * step_scale, pre and not averaged))
    problems = [engine.Problem(init=(b, a), thin=thin, data_coeff=-lr * (1.0 - dampening) * step_scale * grad_coeff,
                               data_precondition=pre, metric=metric, lam=lam, iters=iters,
                               start=_start_side(start, b, first), lam_relative=lam_relative)]
    if use_momentum:
        problems.append(engine.Problem(init=(um, vm), thin=[(um, vm, momentum, False)],
                                       data_coeff=(1.0 - dampening) * grad_coeff, data_precondition=averaged,
                                       metric=metric if averaged else None, lam=lam, iters=iters,
                                       start=_start_side(start, um, first), lam_relative=lam_relative))
    sketched = isinstance(folded, Sketch)
    sums = None if folded is None or folded.sx is None else (folded.sx, folded.sg)
    if row_sums_offset is not None and stats is not None:  # rows without gradient left in the chunks
        sx, sg = sums if sums is not None else (0.0, torch.zeros(b.shape[0], dtype=row_sums_offset.dtype,
                                                                 device=row_sums_offset.device))
        sums = (sx - row_sums_offset, sg)
    layer = engine.Layer(xs=[x for x, _ in chunks], gs=[g for _, g in chunks], problems=problems, stats=stats,
                         dense=None if folded is None or sketched else folded.g,
                         low_rank=folded.low_rank() if sketched else None, dense_sums=sums)
    step = state.get("step", 0) + 1

    def finish(solutions: List[Tuple[Tensor, Tensor]]) -> Update:
        updates = dict(extra_state or {})
        if use_momentum:
            updates["momentum_U"], updates["momentum_V"] = solutions[1]
        updates["step"] = step
        new_b, new_a = solutions[0]
        return Update(new_b, new_a, updates)

    return Plan(layer, finish, b.device)


def plan_scaled_oplora(
    b: Tensor,
    a: Tensor,
    chunks: Chunks,
    state: Dict,
    *,
    lr: float,
    betas: Tuple[float, float],
    damping: float,
    metric_power: float,
    iters: int,
    prox: float,
    start: str,
    metric: str,
    statistics: str,
    loss_reduction: str,
    init_metric_scale: float,
    momentum_rank: int,
    seed: int,
    bias_correction: bool = False,
    relative_damping: bool = False,
    relative_prox: bool = False,
    current_floor: bool = False,
    precondition_momentum: bool = False,
    grad_coeff: float = 1.0,
    rows: Optional[int] = None,
    reduce: Optional[Reduce] = None,
    folded: Optional[Folded] = None,
    row_sums_offset: Optional[Tensor] = None,
) -> Plan:
    """One ScaledOPLoRA step (diagonal fractional K-FAC, SPEC section 3) of a layer as a :class:`Plan`.

    Statistics first (this step's rows included, as Adam's second moment;
    ``oplora.optim.statistics``), then the OPLoRA step with metric
    ``((d_out_hat + delta)^p, (d_in_hat + delta)^p)`` on the gradient and momentum terms,
    coefficients ``[1, -lr (1 - b1) / c1, -lr b1 / c1]``, then the momentum update with
    ``[b1, 1 - b1]`` and no metric. ``c1 = 1 - b1^t`` at the layer's step t with
    ``bias_correction`` (the step then uses the bias-corrected average of the gradients, as Adam's
    first moment; the stored momentum is the uncorrected EMA), else 1; ``d_hat`` is the
    statistics divided by ``1 - b2^t`` with ``bias_correction`` (EMAs started at zero), else the
    statistics (started at ``init_metric_scale``); ``delta`` is ``damping``, or ``damping`` times
    the mean of ``d_hat`` per layer and side with ``relative_damping``
    (``oplora.optim.statistics``); ``relative_prox`` and ``start`` as in :func:`plan_oplora`.
    With ``metric_power = 0`` and no bias correction this is
    exactly :func:`plan_oplora` with ``momentum = dampening = b1``. Diagonal K-FAC statistics are
    summed in the step's first pass over the rows (the engine runs the step itself one pass
    later, the momentum's first half-step alongside the statistics); the other kinds are computed
    up front by :func:`update_statistics` from ``folded``, which must then hold every row of the
    step (``chunks`` empty).

    Data parallel: ``rows`` is the row count of all ranks (default: the local one); the
    diagonal K-FAC sums are reduced with the engine's products (by ``run_plans``'s ``reduce``),
    the dense ones here, by ``reduce``, when the plan is built.
    """
    b1, b2 = betas
    dtype = compute_dtype(b)
    if rows is None:
        rows = sum(x.shape[0] for x, _ in chunks) + (0 if folded is None else folded.rows)
    step = state.get("step", 0) + 1
    stats: Dict[str, Tensor] = {}

    common = dict(lr=lr, momentum=b1, dampening=b1, iters=iters, prox=prox, start=start, relative_prox=relative_prox,
                  precondition_momentum=precondition_momentum,
                  momentum_rank=momentum_rank, seed=seed, grad_coeff=grad_coeff, extra_state=stats, folded=folded,
                  row_sums_offset=row_sums_offset,
                  step_scale=1.0 / _stats.bias_correction(b1, step) if bias_correction and b1 != 0.0 else 1.0)
    spec = StatsSpec(b2, metric, statistics, loss_reduction, init_metric_scale, bias_correction)
    if metric == "diag" and statistics == "kfac":
        rule = KfacDiagRule(state, rows, stats, spec, dtype=dtype, grad_coeff=grad_coeff, damping=damping,
                            power=metric_power, relative_damping=relative_damping, step=step,
                            current_floor=current_floor)
        # With p = 0 the step has no metric: it need not wait for the statistics pass.
        step_metric = engine.STATS if metric_power != 0.0 else None
        return plan_oplora(b, a, chunks, state, metric=step_metric, stats=rule, **common)
    if current_floor:
        raise ValueError("current_floor applies to the diagonal K-FAC statistics (metric='diag', statistics='kfac')")
    if chunks:
        raise ValueError(f"statistics={statistics!r}, metric={metric!r} are computed from the folded rows: "
                         "fold every chunk first")
    d_in, d_out = update_statistics(state, folded, spec, grad_coeff=grad_coeff, rows=rows, reduce=reduce)
    stats["d_in"], stats["d_out"] = d_in, d_out
    step_metric = None
    if metric_power != 0.0:
        correction = _stats.bias_correction(b2, step) if bias_correction else 1.0
        step_metric = tuple(metric_from_statistics(d / correction, damping, metric_power, relative_damping)
                            for d in (d_out, d_in))
    return plan_oplora(b, a, chunks, state, metric=step_metric, **common)


def plan_svd(b: Tensor, a: Tensor, folded: Folded, state: Dict, *, lr: float, momentum: float,
             grad_coeff: float = 1.0) -> Plan:
    """SVDLoRA, the accuracy ideal: ``B A <- rank-r truncated SVD of (B A - lr M)``, as a Plan that
    needs no engine (computed here; nothing is modified). ``G`` is ``folded.g``: every row of
    the step folded into the dense gradient (``oplora.capture.Folded``).

    ``M = G`` without momentum; with momentum the heavy-ball buffer ``M <- momentum M + G``
    (``momentum_buffer``, m x n, kept explicitly: this baseline forms m x n by definition).
    Balanced factors ``B = U_r S_r^1/2``, ``A = S_r^1/2 V_r^T``. The gradient and momentum are
    kept in float32 (float64 for float64 factors); ``B A - lr M`` and its SVD are computed in
    float64, so that a small step is not lost in the rounding of ``B A``.
    """
    dtype = compute_dtype(b)
    g = folded.g.to(dtype)
    if grad_coeff != 1.0:
        g = g * grad_coeff
    buf = None
    if momentum != 0.0:
        buf = state.get("momentum_buffer")
        buf = g if buf is None else buf * momentum + g
        g = buf
    if not bool(torch.isfinite(g).all()):
        raise FloatingPointError("the gradient holds NaN or Inf")
    # In float64: the step is the difference of two nearly equal products when lr is small, and a
    # float32 product and SVD (error eps32 * |B A|) would swamp a step of a few ulps of the factors.
    w = b.double() @ a.double() - lr * g.double()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    root = s[:b.shape[1]].sqrt()
    # When min(m, n) < r the SVD has fewer than r components: the extra factor rows stay zero.
    k = root.shape[0]
    new_b = torch.zeros_like(b, dtype=dtype)
    new_a = torch.zeros_like(a, dtype=dtype)
    new_b[:, :k] = u[:, :k] * root
    new_a[:k] = root[:, None] * vh[:k]
    updates: Dict[str, object] = {"step": state.get("step", 0) + 1}
    if buf is not None:
        updates["momentum_buffer"] = buf
    update = Update(new_b.to(b.dtype), new_a.to(a.dtype), updates)
    return Plan(None, lambda _: update, b.device)


def riemannian_precondition(b: Tensor, a: Tensor, grad_b: Tensor, grad_a: Tensor,
                            damping: float) -> Tuple[Tensor, Tensor]:
    """``(grad_B (A A^T + damping I)^-1, (B^T B + damping I)^-1 grad_A)``, both from the current
    factors, solved (LU, r x r) in float32 (float64 for float64 factors); returned in the
    gradients' dtypes. This is LoRSum's ``iters = 0`` family (scaled GD / Riemannian LoRA).
    """
    dtype = compute_dtype(b)
    r = b.shape[1]
    eye = torch.eye(r, dtype=dtype, device=b.device)
    bf, af = b.to(dtype), a.to(dtype)
    gram_b = bf.mT @ bf + damping * eye
    gram_a = af @ af.mT + damping * eye
    new_ga = torch.linalg.solve(gram_b, grad_a.to(dtype))
    new_gb = torch.linalg.solve(gram_a, grad_b.to(dtype).mT).mT
    return new_gb.to(grad_b.dtype).contiguous(), new_ga.to(grad_a.dtype).contiguous()
