"""FSDP2 (``fully_shard``): LoRA factors that are sharded DTensors, gathered at the step.

Design. ``fully_shard`` per block and at the root -- the recipe of torchtune's LoRA recipes and of
Hugging Face accelerate's FSDP2 plugin -- shards every parameter of a block along its dim 0, the
LoRA factors included (``B`` m x r by its m rows, ``A`` r x n by its r rows). Keeping the LoRA
modules out of the sharding (``ignored_params``) would need a recipe users do not follow, and
FSDP would then leave their gradients unreduced. So the optimizers take the factors as FSDP
leaves them and, at ``step()``, gather what a layer's update reads -- its factors and its state,
both small (r (m + n) numbers and as much again) -- in one all-gather per process group and
dtype for all layers (:func:`gather`). From there the step is the data-parallel one of
``oplora.optim._distributed``, unchanged: each rank captured the rows of its own micro-batches
(the forward runs on FSDP's unsharded parameters, so the hooks see whole factors and whole rows),
the step engine all-reduces its r-sized products and the K-FAC sums through the step context's
``reduce`` hook, and every rank computes the same new factors. Each writes only its own rows of
them into its shard (:func:`commit`): nothing is sent back.

State. A layer's state tensors are DTensors sharded like its factors: every tensor (momentum
``Um`` m x k and ``Vm`` k x n, K-FAC ``d_in``/``d_out``, masters) by the rows of its dim 0 over
the factors' mesh and placements, as FSDP shards parameters and as AdamW's state of a sharded
parameter is sharded. So ``state_dict()`` holds shards, ``torch.distributed.checkpoint`` saves and
reloads them (sharded or full state dicts, ``get_state_dict`` / ``set_state_dict``), and
``load_state_dict`` accepts full tensors too (:func:`adopt`: each rank keeps its rows). The
checkpoint API builds its template from a fresh optimizer by one step with zero gradients and
``lr = 0``; so that the template holds every entry, each layer's state exists from the first
step on, at its start values (:meth:`~oplora.optim.base.LoRAOptimizer._initial_state`: what the
first real step would start from, so the math is unchanged).

Placements: every mesh dimension ``Shard(0)`` (at most one) or ``Replicate()`` -- FSDP2 and HSDP;
anything else (tensor-parallel ``Shard(1)``, ``Partial``) is refused naming the layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .._checks import group_by
from .._dtensor import is_dtensor, local
from . import functional as F

__all__ = ["Layout", "layout_of", "site_layout", "gather", "commit", "shard_state", "adopt"]


@dataclass(frozen=True, eq=False)
class Layout:
    """How a DTensor is laid out: ``mesh`` and ``placements``; ``group`` the process group of the
    one mesh dimension that shards dim 0 (None when nothing is sharded), ``world`` its size and
    ``coord`` this rank's index in it."""

    mesh: object
    placements: tuple
    group: object
    world: int
    coord: int

    def rows(self, n: int) -> Tuple[int, int]:
        """This rank's rows ``[lo, hi)`` of a dim 0 of ``n`` (torch.chunk's split, as DTensor's
        ``Shard(0)``: chunks of ``ceil(n / world)`` rows, the last ones shorter or empty)."""
        if self.group is None:
            return 0, n
        chunk = -(-n // self.world) if n else 0
        lo = min(self.coord * chunk, n)
        return lo, min(lo + chunk, n)

    def same(self, other: "Layout") -> bool:
        return self.mesh == other.mesh and tuple(self.placements) == tuple(other.placements)

    def wrap(self, rows: Tensor, shape: torch.Size) -> Tensor:
        """The DTensor of global ``shape`` (contiguous) whose shard on this rank is ``rows``."""
        from torch.distributed.tensor import DTensor

        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(rows, self.mesh, self.placements, run_check=False, shape=shape, stride=stride)


def layout_of(t: Tensor, what: str) -> Layout:
    """The :class:`Layout` of DTensor ``t``; NotImplementedError naming ``what`` for placements
    other than ``Shard(0)`` (at most one mesh dimension) and ``Replicate()``."""
    mesh, placements = t.device_mesh, tuple(t.placements)
    shard = [d for d, p in enumerate(placements) if p.is_shard()]
    bad = [p for p in placements if not (p.is_replicate() or (p.is_shard() and p.dim == 0))]
    if bad or len(shard) > 1:
        raise NotImplementedError(
            f"{what} is a DTensor with placements {placements}: the oplora optimizers take LoRA factors "
            "sharded along dim 0 on one mesh dimension (FSDP2 fully_shard, HSDP) or replicated; tensor-"
            "parallel LoRA factors are not supported (keep the LoRA modules out of the tensor-parallel plan)")
    if not shard:
        return Layout(mesh, placements, None, 1, 0)
    d = shard[0]
    return Layout(mesh, placements, mesh.get_group(d), mesh.size(d), mesh.get_local_rank(d))


def site_layout(owner: str, site) -> Optional[Layout]:
    """The layout of ``site``'s factors when they are DTensors (both alike), else None; refuses
    (NotImplementedError naming the layer) one factor sharded and the other not, or two layouts."""
    a, b = site.A, site.B
    if not (is_dtensor(a) or is_dtensor(b)):
        return None
    what = f"{owner}: LoRA layer {site.name!r}"
    if not (is_dtensor(a) and is_dtensor(b)):
        raise NotImplementedError(f"{what} has one factor sharded (DTensor) and the other not; shard both "
                                  "(fully_shard the module holding the layer) or neither")
    lb, la = layout_of(b, what), layout_of(a, what)
    if not lb.same(la):
        raise NotImplementedError(f"{what}: its factors are laid out differently (B {lb.placements} on "
                                  f"{lb.mesh}, A {la.placements} on {la.mesh}); shard both with one fully_shard")
    return lb


def gather(tensors: Sequence[Tensor], layouts: Sequence[Optional[Layout]]) -> List[Tensor]:
    """The whole tensors of ``tensors`` (DTensors with ``layouts``; a None layout: ``t`` as it is):
    one all-gather (``all_gather_single``) per (process group, dtype, device) for all of them,
    each rank's rows padded to the chunk size. Plain tensors are returned; nothing is modified."""
    out: List[Optional[Tensor]] = [None] * len(tensors)
    todo = []
    for i, (t, lay) in enumerate(zip(tensors, layouts)):
        if lay is None or lay.group is None:
            out[i] = local(t) if lay is not None else t
        else:
            todo.append(i)
    for index in group_by(todo, lambda i: (id(layouts[i].group), tensors[i].dtype, tensors[i].device)).values():
        lay = layouts[index[0]]
        parts = []
        for i in index:
            t = tensors[i]
            width = math.prod(t.shape[1:])
            chunk = -(-t.shape[0] // lay.world) if t.shape[0] else 0
            parts.append((i, chunk, width))
        size = sum(chunk * width for _, chunk, width in parts)
        t0 = tensors[index[0]]
        send = torch.zeros(size, dtype=t0.dtype, device=t0.device)
        offset = 0
        for i, chunk, width in parts:
            mine = local(tensors[i]).reshape(-1)
            send[offset:offset + mine.numel()] = mine
            offset += chunk * width
        got = torch.empty(lay.world * size, dtype=t0.dtype, device=t0.device)
        _all_gather(got, send, lay.group)
        got = got.view(lay.world, size)
        offset = 0
        for i, chunk, width in parts:
            t = tensors[i]
            block = got[:, offset:offset + chunk * width].reshape(lay.world * chunk, *t.shape[1:])
            out[i] = block[:t.shape[0]].clone()  # its own memory: the state may keep it
            offset += chunk * width
    return out  # type: ignore[return-value]


def _all_gather(out: Tensor, inp: Tensor, group) -> None:
    """``all_gather_single`` where torch has it (2.13 deprecates ``all_gather_into_tensor``, with a
    FutureWarning at a user's first step), else ``all_gather_into_tensor``: the same collective."""
    dist = torch.distributed
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, inp, group=group)


def _matrix(t: Tensor, rows: int) -> Tensor:
    return t if t.dim() == 2 else t.view(rows, -1)


def shard_state(value, lay: Layout):
    """A state value as this rank keeps it: a tensor with dim >= 1 as the DTensor of its rows
    (its own memory), anything else as it is."""
    if not isinstance(value, Tensor) or value.dim() == 0 or is_dtensor(value):
        return value
    lo, hi = lay.rows(value.shape[0])
    return lay.wrap(value[lo:hi].clone(), value.shape)


def commit(items: Sequence[Tuple[object, object, Dict, Layout]]) -> None:
    """Write every ``(update, site, state, layout)`` (``update``: the whole new factors and state,
    ``oplora.optim.functional.Update``): this rank's rows of the factors into its shards, of each
    state tensor into the state's DTensor of that name (in place when it has the shape, dtype and
    device), through ``functional.commit`` (a few ``_foreach_copy_`` for all layers)."""
    targets, wraps = [], []
    for update, site, state, lay in items:
        shapes = {}
        new_state = {}
        for name, value in update.state.items():
            if isinstance(value, Tensor) and value.dim() > 0:
                lo, hi = lay.rows(value.shape[0])
                shapes[name] = value.shape
                value = value[lo:hi]
            new_state[name] = value
        mine = {name: local(value) for name, value in state.items()}
        lb, hb = lay.rows(update.b.shape[0])
        la, ha = lay.rows(update.a.shape[0])
        b_rows, a_rows = local(site.B), local(site.A)
        targets.append((F.Update(update.b[lb:hb], update.a[la:ha], new_state),
                        _matrix(b_rows, b_rows.shape[0]), _matrix(a_rows, a_rows.shape[0]), mine))
        wraps.append((state, mine, shapes, lay))
    F.commit(targets)
    for state, mine, shapes, lay in wraps:
        for name, value in mine.items():
            old = state.get(name)
            if name in shapes:
                if not (is_dtensor(old) and local(old) is value):
                    state[name] = lay.wrap(value, shapes[name])
            else:
                state[name] = value


def adopt(state: Dict, lay: Layout) -> None:
    """A loaded layer's state kept as this rank's shards: whole tensors (a full state dict) cut to
    this rank's rows, DTensors of another layout redistributed (through the whole tensor)."""
    for name, value in list(state.items()):
        if not isinstance(value, Tensor) or value.dim() == 0:
            continue
        if is_dtensor(value):
            if layout_of(value, f"state {name!r}").same(lay):
                continue
            value = value.full_tensor()
        state[name] = shard_state(value, lay)
