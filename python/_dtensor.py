"""DTensors (FSDP2's sharded parameters and gradients) as the rest of the package reads them: a
leaf module, imported by the capture's gradient marks (``oplora.capture.lifetime``) and the optimizers'
FSDP support (``oplora.optim._fsdp``). Nothing of ``torch.distributed`` is imported here: a model
cannot hold DTensors unless ``torch.distributed.tensor`` already is."""

from __future__ import annotations

import sys

from torch import Tensor

__all__ = ["is_dtensor", "local"]


def is_dtensor(t) -> bool:
    """Whether ``t`` is a DTensor."""
    cls = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    return isinstance(cls, type) and isinstance(t, cls)


def local(t):
    """This rank's shard of a DTensor -- the tensor itself, so that writes and version counters
    are the DTensor's -- else ``t`` (None stays None)."""
    if not is_dtensor(t):
        return t
    inner = getattr(t, "_local_tensor", None)
    return inner if isinstance(inner, Tensor) else t.to_local()
