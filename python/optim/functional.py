"""The functional core of the optimizers: one LoRA layer's update from its captured X and sD.

Every optimizer class is a thin shell over these functions (SPEC section 3). Inputs are the
layer's factors ``B`` (m x r) and ``A`` (r x n), its captured ``chunks`` (pairs
``(X_j, sD_j)``, X_j T_j x n, sD_j T_j x m; together the batch of T rows) and its state dict;
the output is an :class:`Update` (new factors, new state entries): nothing is modified.

The implicit gradient ``G = s D^T X = sum_j sD_j^T X_j`` (m x n) enters LoRSum as one thin term
per chunk, ``(sD_j^T, X_j)``: gradient accumulation is handled without concatenating rows, and no
m x n matrix is formed (SVDLoRA, the explicit baseline, excepted).

Precision: LoRSum computes in float32 (float64 when the factors are float64); state tensors are
stored in the factors' dtype except the K-FAC statistics, which are kept in float32 (float64 for
float64 factors), as Adam keeps its moments.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .. import _backend
from ..reference import compute_dtype
from . import engine

__all__ = [
    "Update",
    "commit",
    "Plan",
    "run_plans",
    "plan_oplora",
    "plan_scaled_oplora",
    "init_momentum",
    "oplora_update",
    "update_statistics",
    "metric_from_statistics",
    "scaled_oplora_update",
    "KfacDiagRule",
    "svd_update",
    "riemannian_precondition",
    "grad_sq_norm",
]

Chunks = Sequence[Tuple[Tensor, Tensor]]


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
    by_kind: Dict[tuple, Tuple[List[Tensor], List[Tensor]]] = {}
    for d, s_ in zip(dst, src):
        pair = by_kind.setdefault((d.device, d.dtype, s_.dtype), ([], []))
        pair[0].append(d)
        pair[1].append(s_)
    for d_list, s_list in by_kind.values():
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


class Plan(NamedTuple):
    """A layer's step as engine problems (``layer``) and how to turn their solutions into the
    layer's :class:`Update` (``finish``)."""

    layer: engine.Layer
    finish: Callable[[List[Tuple[Tensor, Tensor]]], Update]
    device: torch.device


def run_plans(plans: Sequence[Plan], reduce: Optional[Callable[[List[Tensor]], None]] = None) -> List[Update]:
    """Solve the plans of many layers together, one engine run per device (``oplora._backend``
    picks the ops), and return their updates in order. ``reduce`` (data parallel) is handed to
    :func:`oplora.optim.engine.solve`: it receives every tensor of each row pass (thin products,
    diagonal K-FAC sums) to reduce in place before they are used."""
    updates: List[Optional[Update]] = [None] * len(plans)
    by_device: Dict[torch.device, List[int]] = {}
    for i, plan in enumerate(plans):
        by_device.setdefault(plan.device, []).append(i)
    for device, index in by_device.items():
        solved = engine.solve([plans[i].layer for i in index], _backend.ops_for(device), reduce)
        for i, sol in zip(index, solved):
            updates[i] = plans[i].finish(sol)
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
    inv_scale: float = 1.0,
    extra_state: Optional[Dict] = None,
) -> Plan:
    """One OPLoRA step of a layer (SPEC section 3) as a :class:`Plan`; see :func:`oplora_update`.

    ``metric`` may be :data:`oplora.optim.engine.STATS` with a ``stats`` rule (the ScaledOPLoRA
    step, whose metric comes from this step's rows). ``extra_state`` is read when the plan
    finishes (the statistics rule fills it during the solve).
    """
    lam = lr * prox
    use_momentum = momentum != 0.0
    if use_momentum:
        if "momentum_U" in state:
            um, vm = state["momentum_U"], state["momentum_V"]
        else:
            um, vm = init_momentum(b, a, momentum_rank, seed)
    pre = metric is not None
    thin = [(b, a, 1.0, False)]
    if use_momentum:
        thin.append((um, vm, -lr * momentum, pre))
    problems = [engine.Problem(init=(b, a), thin=thin, data_coeff=-lr * (1.0 - dampening) * inv_scale,
                               data_precondition=pre, metric=metric, lam=lam, iters=iters, start=start)]
    if use_momentum:
        problems.append(engine.Problem(init=(um, vm), thin=[(um, vm, momentum, False)],
                                       data_coeff=(1.0 - dampening) * inv_scale, lam=lam, iters=iters,
                                       start=start))
    layer = engine.Layer(xs=[x for x, _ in chunks], gs=[g for _, g in chunks], problems=problems, stats=stats)
    step = state.get("step", 0) + 1

    def finish(solutions: List[Tuple[Tensor, Tensor]]) -> Update:
        updates = dict(extra_state or {})
        if use_momentum:
            updates["momentum_U"], updates["momentum_V"] = solutions[1]
        updates["step"] = step
        new_b, new_a = solutions[0]
        return Update(new_b, new_a, updates)

    return Plan(layer, finish, b.device)


def oplora_update(b: Tensor, a: Tensor, chunks: Chunks, state: Dict, **hyper) -> Update:
    """One OPLoRA step of a layer (SPEC section 3), returned as an :class:`Update`.

    1. ``(B, A) <- lorsum([(B, A), (sD^T, X), (Um, Vm)], [1, -lr (1 - dampening), -lr momentum],
       init=(B, A), iters, prox=lr*prox)``; with ``metric=(M_out, M_in)`` the gradient and momentum
       terms are preconditioned (``M_out^-1 T_i M_in^-1``), the ScaledOPLoRA step.
    2. ``(Um, Vm) <- lorsum([(Um, Vm), (sD^T, X)], [momentum, 1 - dampening], init=(Um, Vm),
       iters, prox=lr*prox)``, never with a metric. Skipped altogether when ``momentum == 0``.

    Both use the momentum of before the step; they run together in the step engine
    (:mod:`oplora.optim.engine`), sharing every pass over X and sD. ``state`` keys: ``step``
    (int), ``momentum_U`` (m x k), ``momentum_V`` (k x n), created at the first call.
    ``inv_scale`` multiplies G (the inverse of a GradScaler loss scale). Keyword arguments: those
    of :func:`plan_oplora`.
    """
    return run_plans([plan_oplora(b, a, chunks, state, **hyper)])[0]


def _sum_squares(chunks: Chunks, which: int, dtype: torch.dtype) -> Tensor:
    return sum((c[which].to(dtype).square().sum(0) for c in chunks))


def _grams(chunks: Chunks, which: int, dtype: torch.dtype) -> Tensor:
    return sum((c[which].to(dtype).mT @ c[which].to(dtype) for c in chunks))


def _explicit_grad(chunks: Chunks, dtype: torch.dtype) -> Tensor:
    """G = sum_j sD_j^T X_j (m x n): only for SVDLoRA and the dense Shampoo statistics."""
    return sum((g.to(dtype).mT @ x.to(dtype) for x, g in chunks))


def _row_blocks(chunks: Chunks, dtype: torch.dtype, block: int) -> List[Tuple[Tensor, Tensor]]:
    """The rows of every chunk in blocks of at most ``block`` rows, in ``dtype`` (views when the
    dtype already matches; otherwise one converted copy of the rows in all)."""
    out = []
    for x, g in chunks:
        for lo in range(0, x.shape[0], block):
            out.append((x[lo:lo + block].to(dtype), g[lo:lo + block].to(dtype)))
    return out


def grad_sq_norm(chunks: Chunks, *, method: str = "auto", block: int = 1024) -> Tensor:
    """``||G||_F^2`` of a layer's implicit gradient ``G = sum_j sD_j^T X_j`` (m x n), as a 0-dim
    float64 tensor on the rows' device; computed in float32 (float64 for float64 rows), summed
    in float64. ``chunks``: pairs ``(X_j, sD_j)`` (T_j x n, T_j x m), T rows in all.

    Three ways to get it, by cost (multiply-adds):

    * ``"rows"``: the T x T row Grams, ``||G||^2 = sum_{i,k} <X_i X_k^T, sD_i sD_k^T>`` over
      blocks i, k of at most ``block`` rows (``(i, k)`` and ``(k, i)`` counted once, doubled):
      ``T^2 (m + n) / 2`` work, ``2 block^2`` memory -- the cheaper one for few rows;
    * ``"explicit"``: G formed in blocks of ``block`` of its m rows (``G[lo:hi] = sum_j
      sD_j[:, lo:hi]^T X_j``, never all of m x n at once): ``T m n`` work, ``block n`` memory --
      the cheaper one when ``T (m + n) / 2 > m n``;
    * the column Grams ``<X^T X, sD^T sD>`` (n x n, m x m) are never cheaper than ``"explicit"``:
      ``T (n^2 + m^2) >= 2 T m n`` work and ``n^2 + m^2 >= 2 m n`` memory, so they are not used.

    ``"auto"`` (default) picks the cheaper of the first two. Nothing is modified.
    """
    if method not in ("auto", "rows", "explicit"):
        raise ValueError(f"method must be 'auto', 'rows' or 'explicit', got {method!r}")
    dtype = compute_dtype(*(t for pair in chunks for t in pair))
    device = chunks[0][0].device
    rows = sum(x.shape[0] for x, _ in chunks)
    n, m = chunks[0][0].shape[1], chunks[0][1].shape[1]
    if method == "auto":
        method = "rows" if rows * (m + n) <= 2 * m * n else "explicit"
    total = torch.zeros((), dtype=torch.float64, device=device)
    if method == "rows":
        blocks = _row_blocks(chunks, dtype, block)
        for i, (xi, gi) in enumerate(blocks):
            total += ((xi @ xi.mT) * (gi @ gi.mT)).sum(dtype=torch.float64)
            for xk, gk in blocks[i + 1:]:
                total += 2.0 * ((xi @ xk.mT) * (gi @ gk.mT)).sum(dtype=torch.float64)
        # Rounding can leave a tiny negative sum when G is (nearly) zero.
        return total.clamp_min(0.0)
    for lo in range(0, m, block):
        g_blk = sum((g[:, lo:lo + block].to(dtype).mT @ x.to(dtype) for x, g in chunks))
        total += g_blk.square().sum(dtype=torch.float64)
    return total


def _shampoo_diagonals(chunks: Chunks, dtype: torch.dtype, block: int = 256) -> Tuple[Tensor, Tensor]:
    """``diag(G G^T)`` (m,) and ``diag(G^T G)`` (n,) without holding G: rows of G in blocks."""
    m = chunks[0][1].shape[1]
    n = chunks[0][0].shape[1]
    rows = torch.empty(m, dtype=dtype, device=chunks[0][0].device)
    cols = torch.zeros(n, dtype=dtype, device=chunks[0][0].device)
    for lo in range(0, m, block):
        g_blk = sum((g[:, lo:lo + block].to(dtype).mT @ x.to(dtype) for x, g in chunks))
        sq = g_blk.square()
        rows[lo:lo + block] = sq.sum(1)
        cols += sq.sum(0)
    return rows, cols


def _statistics_start(state: Dict, *, metric: str, init_scale: float, n: int, m: int, device: torch.device,
                      dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    if "d_in" in state:
        return state["d_in"], state["d_out"]
    if metric == "diag":
        return (torch.full((n,), init_scale, dtype=dtype, device=device),
                torch.full((m,), init_scale, dtype=dtype, device=device))
    return init_scale * torch.eye(n, dtype=dtype, device=device), init_scale * torch.eye(m, dtype=dtype, device=device)


def _out_scale(rows: int, loss_reduction: str, inv_scale: float) -> float:
    """``c * inv_scale^2``: c = T for a mean loss, 1/T for a summed one (SPEC section 3)."""
    return (float(rows) if loss_reduction == "mean" else 1.0 / rows) * inv_scale**2


class KfacDiagRule(engine.StatsRule):
    """A layer's diagonal K-FAC statistics as the step engine's :class:`~oplora.optim.engine.StatsRule`:
    ``d_in <- b2 d_in + (1 - b2) sx / T`` and ``d_out <- b2 d_out + (1 - b2) c sg`` (see
    :func:`update_statistics`) from the column sums of squares of the step's first pass over the
    rows, ``sx = sum_t x_t^2`` (n) and ``sg = sum_t g_t^2`` (m), and the metric
    ``((d_out + damping)^p, (d_in + damping)^p)`` (none when ``p = 0``). :meth:`batch` evaluates
    the rules of a group's layers on stacks (per-layer ``T`` and ``c`` as a b x 1 tensor when they
    differ) and writes each layer's new EMAs to its ``out["d_in"]``, ``out["d_out"]``."""

    def __init__(self, state: Dict, rows: int, out: Dict, *, beta2: float, loss_reduction: str, init_scale: float,
                 dtype: torch.dtype, inv_scale: float, damping: float, power: float):
        self.state, self.rows, self.out = state, rows, out
        self.out_scale = _out_scale(rows, loss_reduction, inv_scale)
        self.beta2, self.init_scale, self.dtype, self.damping, self.power = beta2, init_scale, dtype, damping, power
        self.key = (beta2, init_scale, dtype, damping, power)

    @staticmethod
    def batch(rules: Sequence["KfacDiagRule"], sx: Tensor, sg: Tensor
              ) -> Optional[Tuple[Optional[Tensor], Optional[Tensor]]]:
        first = rules[0]
        starts = [_statistics_start(rule.state, metric="diag", init_scale=first.init_scale, n=sx.shape[-1],
                                    m=sg.shape[-1], device=sx.device, dtype=first.dtype) for rule in rules]
        d_in, d_out = (engine.stack_layers([start[k] for start in starts]) for k in (0, 1))
        rows, out_scale = (_per_layer([getattr(rule, name) for rule in rules], sx) for name in ("rows", "out_scale"))
        b2 = first.beta2
        new_in = d_in * b2 + (1.0 - b2) * (sx.to(first.dtype) / rows)
        new_out = d_out * b2 + (1.0 - b2) * (sg.to(first.dtype) * out_scale)
        for rule, d_in_i, d_out_i in zip(rules, new_in, new_out):
            rule.out["d_in"], rule.out["d_out"] = d_in_i, d_out_i
        if first.power == 0.0:
            return None
        return (_diag_metric(new_out, first.damping, first.power), _diag_metric(new_in, first.damping, first.power))


def _per_layer(values: Sequence[float], like: Tensor) -> Union[float, Tensor]:
    """One number per layer of a stack: a float when they are all equal, else a b x 1 tensor."""
    if all(v == values[0] for v in values):
        return float(values[0])
    return torch.tensor(values, dtype=torch.float64, device=like.device)[:, None]


def update_statistics(
    state: Dict,
    chunks: Chunks,
    *,
    beta2: float,
    metric: str,
    statistics: str,
    loss_reduction: str,
    init_scale: float,
    n: int,
    m: int,
    device: torch.device,
    dtype: torch.dtype,
    inv_scale: float = 1.0,
    rows: Optional[int] = None,
    reduce: Optional[Callable[[List[Tensor]], None]] = None,
) -> Tuple[Tensor, Tensor]:
    """The EMAs ``d_in`` and ``d_out`` of ``state`` updated by this step's rows (SPEC section 3),
    as new tensors (``state`` is not modified).

    ``statistics="kfac"`` (the diagonal fractional K-FAC of the paper): the factors of G,
    ``d_in <- b2 d_in + (1 - b2) mean_t x_t^2`` and ``d_out <- b2 d_out + (1 - b2) c sum_t g_t^2``
    with ``g_t = s D_t`` and ``c = T`` for a mean loss (per-example gradient scale), ``1/T`` for a
    summed loss. ``metric="dense"`` keeps the matrices ``X^T X / T`` (n x n) and ``c g^T g``
    (m x m) instead of their diagonals. (The optimizers compute the diagonal K-FAC sums inside the
    step's first pass over the rows, :class:`KfacDiagRule`; this function is their reference and
    computes every other kind.)

    ``statistics="shampoo"``: the statistics of G itself, ``d_out`` from ``c G G^T`` and ``d_in``
    from ``c G^T G`` (diagonals, or the matrices with ``metric="dense"``, which forms G), with
    the same ``c`` as the authors' code. Shampoo's own preconditioner is ``L^-1/4 G R^-1/4``,
    i.e. ``metric_power=0.25``.

    The EMAs start at ``init_scale * ones`` (``init_scale * I`` for dense). ``inv_scale`` is the
    multiplier of the captured sD (the inverse GradScaler loss scale, a clipping coefficient,
    ``1/world`` under data parallelism): its statistics scale by its square.

    Data parallel (K-FAC only): ``rows`` is the row count of all ranks together (default: the
    local one) and ``reduce`` sums the local sums of squares (or Grams) over the ranks in place
    before they are scaled; the Shampoo statistics need G itself and take no ``reduce``.
    """
    if rows is None:
        rows = sum(x.shape[0] for x, _ in chunks)
    d_in, d_out = _statistics_start(state, metric=metric, init_scale=init_scale, n=n, m=m, device=device,
                                    dtype=dtype)
    out_scale = _out_scale(rows, loss_reduction, inv_scale)
    if statistics == "kfac":
        sums = _sum_squares if metric == "diag" else _grams
        sum_in, sum_out = sums(chunks, 0, dtype), sums(chunks, 1, dtype)
        if reduce is not None:
            reduce([sum_in, sum_out])
        new_in, new_out = sum_in / rows, sum_out * out_scale
    else:
        if reduce is not None:
            raise ValueError("the Shampoo statistics need the m x n gradient G itself; they cannot be "
                             "reduced over data-parallel ranks from thin products")
        if metric == "diag":
            new_out, new_in = _shampoo_diagonals(chunks, dtype)
        else:
            g = _explicit_grad(chunks, dtype)
            new_out, new_in = g @ g.mT, g.mT @ g
        new_out, new_in = new_out * out_scale, new_in * out_scale
    return d_in * beta2 + (1.0 - beta2) * new_in, d_out * beta2 + (1.0 - beta2) * new_out


def _diag_metric(d: Tensor, damping: float, power: float) -> Tensor:
    """``(d + damping)^power`` elementwise (any shape); ones for ``power = 0``."""
    return torch.ones_like(d) if power == 0.0 else (d + damping).pow(power)


def metric_from_statistics(d: Tensor, damping: float, power: float) -> Tensor:
    """``(d + damping)^power``: elementwise for a diagonal, by eigen-decomposition for a matrix.

    ``power = 0`` gives the identity metric (ones, or I) exactly.
    """
    if d.dim() == 1:
        return _diag_metric(d, damping, power)
    if power == 0.0:
        return torch.eye(d.shape[0], dtype=d.dtype, device=d.device)
    sym = 0.5 * (d + d.mT)
    evals, evecs = torch.linalg.eigh(sym.double())
    # An EMA of Gram matrices is PSD; clamp the rounding-level negative eigenvalues.
    scaled = evecs * (evals.clamp_min(0.0) + damping).pow(power)
    out = scaled @ evecs.mT
    return (0.5 * (out + out.mT)).to(d.dtype)


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
    inv_scale: float = 1.0,
    rows: Optional[int] = None,
    reduce: Optional[Callable[[List[Tensor]], None]] = None,
) -> Plan:
    """One ScaledOPLoRA step of a layer as a :class:`Plan`; see :func:`scaled_oplora_update`.

    Diagonal K-FAC statistics are summed in the step's first pass over the rows (the engine runs
    the step itself one pass later, the momentum's first half-step alongside the statistics);
    the other kinds are computed up front by :func:`update_statistics`.

    Data parallel: ``rows`` is the row count of all ranks (default: the local one); the
    diagonal K-FAC sums are reduced with the engine's products (by ``run_plans``'s ``reduce``),
    the dense ones here, by ``reduce``, when the plan is built.
    """
    b1, b2 = betas
    dtype = compute_dtype(b)
    if rows is None:
        rows = sum(x.shape[0] for x, _ in chunks)
    stats: Dict[str, Tensor] = {}

    common = dict(lr=lr, momentum=b1, dampening=b1, iters=iters, prox=prox, start=start,
                  momentum_rank=momentum_rank, seed=seed, inv_scale=inv_scale, extra_state=stats)
    if metric == "diag" and statistics == "kfac":
        rule = KfacDiagRule(state, rows, stats, beta2=b2, loss_reduction=loss_reduction,
                            init_scale=init_metric_scale, dtype=dtype, inv_scale=inv_scale, damping=damping,
                            power=metric_power)
        # With p = 0 the step has no metric: it need not wait for the statistics pass.
        step_metric = engine.STATS if metric_power != 0.0 else None
        return plan_oplora(b, a, chunks, state, metric=step_metric, stats=rule, **common)
    d_in, d_out = update_statistics(state, chunks, beta2=b2, metric=metric, statistics=statistics,
                                    loss_reduction=loss_reduction, init_scale=init_metric_scale,
                                    n=a.shape[1], m=b.shape[0], device=b.device, dtype=dtype, inv_scale=inv_scale,
                                    rows=rows, reduce=reduce)
    stats["d_in"], stats["d_out"] = d_in, d_out
    step_metric = None
    if metric_power != 0.0:
        step_metric = (metric_from_statistics(d_out, damping, metric_power),
                       metric_from_statistics(d_in, damping, metric_power))
    return plan_oplora(b, a, chunks, state, metric=step_metric, **common)


def scaled_oplora_update(b: Tensor, a: Tensor, chunks: Chunks, state: Dict, **hyper) -> Update:
    """One ScaledOPLoRA step (diagonal fractional K-FAC, SPEC section 3), as an :class:`Update`.

    Statistics first (this step's rows included, as Adam's second moment), then the OPLoRA step
    with metric ``((d_out + damping)^p, (d_in + damping)^p)`` on the gradient and momentum terms,
    coefficients ``[1, -lr (1 - b1), -lr b1]``, then the momentum update with ``[b1, 1 - b1]`` and
    no metric. With ``metric_power = 0`` this is exactly ``oplora_update`` with
    ``momentum = dampening = b1``. Keyword arguments: those of :func:`plan_scaled_oplora`.
    """
    return run_plans([plan_scaled_oplora(b, a, chunks, state, **hyper)])[0]


def svd_update(b: Tensor, a: Tensor, chunks: Chunks, state: Dict, *, lr: float, momentum: float,
               inv_scale: float = 1.0) -> Update:
    """SVDLoRA, the accuracy ideal: ``B A <- rank-r truncated SVD of (B A - lr M)``, as an Update.

    ``M = G`` without momentum; with momentum the heavy-ball buffer ``M <- momentum M + G``
    (``momentum_buffer``, m x n, kept explicitly: this baseline forms m x n by definition).
    Balanced factors ``B = U_r S_r^1/2``, ``A = S_r^1/2 V_r^T``. Computed in float32 (float64 for
    float64 factors).
    """
    dtype = compute_dtype(b)
    g = _explicit_grad(chunks, dtype)
    if inv_scale != 1.0:
        g = g * inv_scale
    buf = None
    if momentum != 0.0:
        buf = state.get("momentum_buffer")
        buf = g if buf is None else buf * momentum + g
        g = buf
    w = b.to(dtype) @ a.to(dtype) - lr * g
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    r = b.shape[1]
    root = s[:r].sqrt()
    # When min(m, n) < r the SVD has fewer than r components: the extra factor rows stay zero.
    k = root.shape[0]
    new_b = torch.zeros_like(b, dtype=dtype)
    new_a = torch.zeros_like(a, dtype=dtype)
    new_b[:, :k] = u[:, :k] * root
    new_a[:k] = root[:, None] * vh[:k]
    updates: Dict[str, object] = {"step": state.get("step", 0) + 1}
    if buf is not None:
        updates["momentum_buffer"] = buf
    return Update(new_b.to(b.dtype), new_a.to(a.dtype), updates)


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
