"""Float32 master factors (``master_factors=True``) for LoRA factors stored in bfloat16/float16.

Every step is computed in float32 (SPEC section 3) and stored in the factors' dtype; stored in
bf16, an update smaller than half a unit of the factor's precision (about 0.4% of it) rounds
away, step after step. With master factors the state keeps ``master_B`` (m x r) and
``master_A`` (r x n) in float32: the step starts from them and writes its float32 result into
them, and the factors get its rounding. So the factors are always the masters rounded, and no
update is lost. A factor changed outside the optimizer since (a reload of the model's weights, a
re-initialisation: its value is no longer the masters' rounding) restarts its masters from it.

Memory: 4 bytes per LoRA parameter for the masters; the momentum, kept in the dtype of what is
stepped, becomes float32 too (4 bytes instead of 2).
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
from torch import Tensor

from .._checks import group_by

__all__ = ["LOW", "wanted", "factors"]

#: The factor dtypes that get master factors.
LOW = (torch.bfloat16, torch.float16)


def wanted(site) -> bool:
    """Whether ``site``'s factors are stored in a dtype that gets master factors."""
    return site.B.dtype in LOW or site.A.dtype in LOW


def _fresh(b: Tensor, a: Tensor) -> Tuple[Tensor, Tensor]:
    return b.detach().float(), a.detach().float()


def factors(sites: Sequence, views: Dict[int, Tuple[Tensor, Tensor, Dict]],
            indices: Sequence[int]) -> Dict[int, Tuple[Tensor, Tensor]]:
    """The float32 ``(B, A)`` (matrices) to step from, for each of ``indices`` whose site
    :func:`wanted` them: the state's masters when the factors are still their rounding, else new
    float32 copies of the factors (nothing is written; one host synchronisation for all).
    ``views[i]``: the layer's factors as matrices and its state, as the step reads them (whole
    tensors, gathered under FSDP2: ``oplora.optim._fsdp``)."""
    out: Dict[int, Tuple[Tensor, Tensor]] = {}
    checks: List[Tuple[int, Tensor]] = []
    for i in indices:
        if not wanted(sites[i]):
            continue
        b, a, entry = views[i]
        mb, ma = entry.get("master_B"), entry.get("master_A")
        if (isinstance(mb, Tensor) and isinstance(ma, Tensor) and mb.shape == b.shape and ma.shape == a.shape
                and mb.device == b.device and ma.device == a.device):
            out[i] = (mb, ma)
            checks.append((i, (mb.to(b.dtype) != b).any() | (ma.to(a.dtype) != a).any()))
        else:
            out[i] = _fresh(b, a)
    for index in group_by(range(len(checks)), lambda k: checks[k][1].device).values():
        changed = torch.stack([checks[k][1] for k in index]).tolist()
        for k, stale in zip(index, changed):
            if stale:
                out[checks[k][0]] = _fresh(*views[checks[k][0]][:2])
    return out
