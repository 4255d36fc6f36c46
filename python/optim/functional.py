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
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import _backend
from ..reference import compute_dtype

__all__ = [
    "Update",
    "grad_terms",
    "init_momentum",
    "oplora_update",
    "update_statistics",
    "metric_from_statistics",
    "scaled_oplora_update",
    "svd_update",
    "riemannian_precondition",
]

Chunks = Sequence[Tuple[Tensor, Tensor]]


class Update(NamedTuple):
    """A layer's computed step: new factors and the state entries to write. The update functions
    modify nothing, so that the optimizer commits all layers only once every solve succeeded."""

    b: Tensor
    a: Tensor
    state: Dict[str, object]

    def apply(self, b: Tensor, a: Tensor, state: Dict) -> None:
        b.copy_(self.b)
        a.copy_(self.a)
        state.update(self.state)


def grad_terms(chunks: Chunks) -> List[Tuple[Tensor, Tensor]]:
    """The thin terms ``(sD_j^T, X_j)`` whose sum is G (views, no copies)."""
    return [(g.mT, x) for x, g in chunks]


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


def _lorsum(device: torch.device) -> Callable:
    return _backend.lorsum_impl(device)


def oplora_update(
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
    metric: Optional[Tuple[Tensor, Tensor]] = None,
    inv_scale: float = 1.0,
    extra_state: Optional[Dict] = None,
) -> Update:
    """One OPLoRA step of a layer (SPEC section 3), returned as an :class:`Update`.

    1. ``(B, A) <- lorsum([(B, A), (sD^T, X), (Um, Vm)], [1, -lr (1 - dampening), -lr momentum],
       init=(B, A), iters, prox=lr*prox)``; with ``metric=(M_out, M_in)`` the gradient and momentum
       terms are preconditioned (``M_out^-1 T_i M_in^-1``), the ScaledOPLoRA step.
    2. ``(Um, Vm) <- lorsum([(Um, Vm), (sD^T, X)], [momentum, 1 - dampening], init=(Um, Vm),
       iters, prox=lr*prox)``, never with a metric. Skipped altogether when ``momentum == 0``.

    Both use the momentum of before the step. ``state`` keys: ``step`` (int), ``momentum_U``
    (m x k), ``momentum_V`` (k x n), created at the first call. ``inv_scale`` multiplies G (the
    inverse of a GradScaler loss scale). ``extra_state`` (optional): more entries for the update.
    """
    lorsum = _lorsum(b.device)
    lam = lr * prox
    gterms = grad_terms(chunks)
    use_momentum = momentum != 0.0
    if use_momentum:
        if "momentum_U" in state:
            um, vm = state["momentum_U"], state["momentum_V"]
        else:
            um, vm = init_momentum(b, a, momentum_rank, seed)
    terms = [(b, a)] + gterms
    coeffs = [1.0] + [-lr * (1.0 - dampening) * inv_scale] * len(gterms)
    if use_momentum:
        terms.append((um, vm))
        coeffs.append(-lr * momentum)
    precondition = None
    if metric is not None:
        precondition = [False] + [True] * (len(terms) - 1)
    new_b, new_a = lorsum(terms, coeffs, (b, a), iters=iters, prox=lam, metric=metric,
                          precondition=precondition, start=start)
    if use_momentum:
        new_um, new_vm = lorsum([(um, vm)] + gterms, [momentum] + [(1.0 - dampening) * inv_scale] * len(gterms),
                                (um, vm), iters=iters, prox=lam, start=start)
    updates = dict(extra_state or {})
    if use_momentum:
        updates["momentum_U"], updates["momentum_V"] = new_um, new_vm
    updates["step"] = state.get("step", 0) + 1
    return Update(new_b, new_a, updates)


def _sum_squares(chunks: Chunks, which: int, dtype: torch.dtype) -> Tensor:
    return sum((c[which].to(dtype).square().sum(0) for c in chunks))


def _grams(chunks: Chunks, which: int, dtype: torch.dtype) -> Tensor:
    return sum((c[which].to(dtype).mT @ c[which].to(dtype) for c in chunks))


def _explicit_grad(chunks: Chunks, dtype: torch.dtype) -> Tensor:
    """G = sum_j sD_j^T X_j (m x n): only for SVDLoRA and the dense Shampoo statistics."""
    return sum((g.to(dtype).mT @ x.to(dtype) for x, g in chunks))


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
) -> Tuple[Tensor, Tensor]:
    """The EMAs ``d_in`` and ``d_out`` of ``state`` updated by this step's rows (SPEC section 3),
    as new tensors (``state`` is not modified).

    ``statistics="kfac"`` (the diagonal fractional K-FAC of the paper): the factors of G,
    ``d_in <- b2 d_in + (1 - b2) mean_t x_t^2`` and ``d_out <- b2 d_out + (1 - b2) c sum_t g_t^2``
    with ``g_t = s D_t`` and ``c = T`` for a mean loss (per-example gradient scale), ``1/T`` for a
    summed loss. ``metric="dense"`` keeps the matrices ``X^T X / T`` (n x n) and ``c g^T g``
    (m x m) instead of their diagonals.

    ``statistics="shampoo"``: the statistics of G itself, ``d_out`` from ``c G G^T`` and ``d_in``
    from ``c G^T G`` (diagonals, or the matrices with ``metric="dense"``, which forms G), with
    the same ``c`` as the authors' code. Shampoo's own preconditioner is ``L^-1/4 G R^-1/4``,
    i.e. ``metric_power=0.25``.

    The EMAs start at ``init_scale * ones`` (``init_scale * I`` for dense). ``inv_scale`` is the
    inverse GradScaler loss scale of the captured sD (its statistics scale by its square).
    """
    rows = sum(x.shape[0] for x, _ in chunks)
    if "d_in" in state:
        d_in, d_out = state["d_in"], state["d_out"]
    elif metric == "diag":
        d_in = torch.full((n,), init_scale, dtype=dtype, device=device)
        d_out = torch.full((m,), init_scale, dtype=dtype, device=device)
    else:
        d_in = init_scale * torch.eye(n, dtype=dtype, device=device)
        d_out = init_scale * torch.eye(m, dtype=dtype, device=device)
    scale = float(rows) if loss_reduction == "mean" else 1.0 / rows
    if statistics == "kfac":
        if metric == "diag":
            new_in = _sum_squares(chunks, 0, dtype) / rows
            new_out = _sum_squares(chunks, 1, dtype) * (scale * inv_scale**2)
        else:
            new_in = _grams(chunks, 0, dtype) / rows
            new_out = _grams(chunks, 1, dtype) * (scale * inv_scale**2)
    else:
        if metric == "diag":
            new_out, new_in = _shampoo_diagonals(chunks, dtype)
        else:
            g = _explicit_grad(chunks, dtype)
            new_out, new_in = g @ g.mT, g.mT @ g
        new_out, new_in = new_out * (scale * inv_scale**2), new_in * (scale * inv_scale**2)
    return d_in * beta2 + (1.0 - beta2) * new_in, d_out * beta2 + (1.0 - beta2) * new_out


def metric_from_statistics(d: Tensor, damping: float, power: float) -> Tensor:
    """``(d + damping)^power``: elementwise for a diagonal, by eigen-decomposition for a matrix.

    ``power = 0`` gives the identity metric (ones, or I) exactly.
    """
    if d.dim() == 1:
        if power == 0.0:
            return torch.ones_like(d)
        return (d + damping).pow(power)
    if power == 0.0:
        return torch.eye(d.shape[0], dtype=d.dtype, device=d.device)
    sym = 0.5 * (d + d.mT)
    evals, evecs = torch.linalg.eigh(sym.double())
    # An EMA of Gram matrices is PSD; clamp the rounding-level negative eigenvalues.
    scaled = evecs * (evals.clamp_min(0.0) + damping).pow(power)
    out = scaled @ evecs.mT
    return (0.5 * (out + out.mT)).to(d.dtype)


def scaled_oplora_update(
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
) -> Update:
    """One ScaledOPLoRA step (diagonal fractional K-FAC, SPEC section 3), as an :class:`Update`.

    Statistics first (this step's rows included, as Adam's second moment), then the OPLoRA step
    with metric ``((d_out + damping)^p, (d_in + damping)^p)`` on the gradient and momentum terms,
    coefficients ``[1, -lr (1 - b1), -lr b1]``, then the momentum update with ``[b1, 1 - b1]`` and
    no metric. With ``metric_power = 0`` this is exactly ``oplora_update`` with
    ``momentum = dampening = b1``.
    """
    b1, b2 = betas
    d_in, d_out = update_statistics(state, chunks, beta2=b2, metric=metric, statistics=statistics,
                                    loss_reduction=loss_reduction, init_scale=init_metric_scale,
                                    n=a.shape[1], m=b.shape[0], device=b.device, dtype=compute_dtype(b),
                                    inv_scale=inv_scale)
    met = None
    if metric_power != 0.0:
        met = (metric_from_statistics(d_out, damping, metric_power),
               metric_from_statistics(d_in, damping, metric_power))
    return oplora_update(b, a, chunks, state, lr=lr, momentum=b1, dampening=b1, iters=iters, prox=prox,
                         start=start, momentum_rank=momentum_rank, seed=seed, metric=met, inv_scale=inv_scale,
                         extra_state={"d_in": d_in, "d_out": d_out})


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
