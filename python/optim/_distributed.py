"""Data-parallel plumbing of the optimizers (SPEC section 3, "Distributed"): which process group,
how the ranks agree on a step, and the sum that the step engine's reduce hook performs.

With ``world > 1`` ranks in the group, each rank captures its own rows. A step first
all-reduces a small header (per-layer row counts, whether any rank found a bad value or refused
the step, so every rank raises or skips together: :func:`agree`), then the step engine
all-reduces, after each of its passes, the thin products (r-sized) and the K-FAC column sums in
one flat buffer (:func:`all_reduce_sum`, the step context's ``reduce``). The products are
averaged (the step context's ``grad_coeff`` carries 1 / world): under DDP each rank's sD is that
of its local mean loss, and DDP's averaged gradient is ``G = (1/world) sum_k G_k`` -- the
concatenated batch's when the ranks hold equal shares. The statistics treat ``sD_k / world`` as
the rows of that gradient: ``d_in`` from the summed ``sum_t x_t^2`` over the global row count T,
``d_out`` from ``c * sum_k sum_t g_t^2 / world^2`` with ``c`` = global T (mean loss), so that the
per-example scale is the concatenated batch's. The momentum seed is broadcast from the group's
rank 0 at construction (:func:`broadcast_seed`: build the optimizer after
``init_process_group``). The other parameters get DDP's averaged ``.grad``. Never X, D or an
m x n matrix crosses the network, which is why clipping of the captured optimizers (the norm of
the averaged implicit gradient needs every rank's m x n gradient or rows), SVDLoRA and Shampoo
statistics (both need G) are refused on several ranks.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .._checks import group_by

__all__ = ["resolve_group", "all_reduce_sum", "broadcast_seed", "agree", "network_bytes"]


def resolve_group(process_group):
    """The process group to reduce over: ``process_group``, else the default group when
    torch.distributed is initialized; None when that group has a single rank (nothing to reduce)."""
    dist = torch.distributed
    initialized = dist.is_available() and dist.is_initialized()
    if process_group is not None:
        if not initialized:
            raise ValueError("process_group was given but torch.distributed is not initialized")
        if not isinstance(process_group, dist.ProcessGroup):
            raise ValueError(f"process_group must be a torch.distributed.ProcessGroup or None, got "
                             f"{type(process_group).__name__}")
        group = process_group
    elif initialized:
        group = dist.group.WORLD
    else:
        return None
    return group if dist.get_world_size(group) > 1 else None


def all_reduce_sum(tensors: Sequence[Tensor], group) -> None:
    """Sum ``tensors`` over the ranks of ``group`` in place: one all-reduce of one flat buffer per
    (device, dtype) -- in practice one per call."""
    for index in group_by(tensors, lambda t: (t.device, t.dtype)).values():
        ts = [tensors[i] for i in index]
        flat = torch.cat([t.reshape(-1) for t in ts])
        torch.distributed.all_reduce(flat, group=group)
        offset = 0
        for t in ts:
            t.copy_(flat[offset:offset + t.numel()].view(t.shape))
            offset += t.numel()


def broadcast_seed(seed: int, group, device: torch.device) -> int:
    """The seed of the group's rank 0 (every rank starts the momentum from the same random Vm)."""
    t = torch.tensor([int(seed)], dtype=torch.int64, device=device)
    torch.distributed.broadcast(t, src=torch.distributed.get_global_rank(group, 0), group=group)
    return int(t.item())


def agree(owner: str, group, error: Optional[BaseException], bad: Optional[str], rows: List[int],
          device: torch.device) -> Tuple[Optional[str], List[int]]:
    """Make every rank take the same decision about this step: one all-reduce of a header
    (whether a rank raised ``error``, whether one found a bad value, the per-layer row counts).
    Raises ``error`` on its rank and a RuntimeError on the others; returns the bad value's
    description (another rank's when only it found one) and the global row counts."""
    header = torch.tensor([error is not None, bad is not None, *rows], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(header, group=group)
    n_error, n_bad, *rows = (int(v) for v in header.tolist())
    if error is not None:
        raise error
    if n_error:
        raise RuntimeError(f"{owner}: another rank of the process group refused this step (its error says "
                           "why); nothing was updated on any rank")
    if n_bad and bad is None:
        bad = "a captured tensor or gradient on another rank"
    return bad, rows


def network_bytes(shapes: Sequence[Tuple[int, int]], rank: int, *, optimizer: str = "oplora", iters: int = 1,
                  momentum: bool = True, momentum_rank: Optional[int] = None, factor_bytes: int = 4,
                  product_bytes: int = 4, fsdp: bool = True) -> dict:
    """Bytes of the buffers one ``step()`` reduces or gathers, for LoRA layers of ``shapes``
    (``(m, n)`` each, rank ``rank``), next to those of the data-parallel wrapper's own gradient
    reduction of the factors. Payload sizes: a ring all-reduce sends about ``2 (W - 1) / W`` of
    its buffer per rank, an all-gather or reduce-scatter ``(W - 1) / W``.

    * ``all_reduce``: the step engine's products (``product_bytes`` each, float32): per layer and
      LoRSum round, ``(m + n) (r + k)`` -- the A-side products ``G^T Q`` (n x (r + k)) and the
      B-side ``G Q`` (m x (r + k)) of the step's and the momentum's problems, k = the momentum's
      rank (``momentum_rank or r``; 0 without momentum); ``iters = 0`` (one Jacobi pass) as one
      round; plus ScaledOPLoRA's K-FAC column sums (m + n) and the header (float64: two flags and
      one row count per layer).
    * ``all_gather`` (FSDP2, ``fsdp=True``): the factors and the state gathered at the step --
      ``r (m + n)`` factor entries (``factor_bytes``), the momentum ``k (m + n)``, ScaledOPLoRA's
      ``d_in``, ``d_out`` (float32).
    * ``grad_reduce``: what FSDP's reduce-scatter (DDP's all-reduce) of the factors' gradients
      moves anyway, ``r (m + n)`` entries of ``factor_bytes``.
    """
    if optimizer not in ("oplora", "scaled"):
        raise ValueError(f"optimizer must be 'oplora' or 'scaled', got {optimizer!r}")
    k = (momentum_rank or rank) if momentum else 0
    rounds = max(int(iters), 1)
    sides = sum(m + n for m, n in shapes)
    products = rounds * sides * (rank + k) + (sides if optimizer == "scaled" else 0)
    header = 8 * (2 + len(shapes))
    out = {"all_reduce": products * product_bytes + header, "grad_reduce": rank * sides * factor_bytes}
    if fsdp:
        state = k * sides * factor_bytes + (4 * sides if optimizer == "scaled" else 0)
        out["all_gather"] = rank * sides * factor_bytes + state
    return out
