"""Two helpers of the capture hooks (``oplora.capture``): whether a running backward pass
accumulates into a parameter, and hooks that torch.compile never traces."""

from __future__ import annotations

import torch

__all__ = ["accumulates", "eager"]


def accumulates(node) -> bool:
    """Whether the running backward pass will execute ``node`` (a parameter's AccumulateGrad)."""
    will_execute = getattr(torch._C, "_will_engine_execute_node", None)
    if will_execute is None:  # an older torch without the query: record every pass
        return True
    try:
        return bool(will_execute(node))
    except RuntimeError:  # torch.autograd.grad(): leaf gradients are returned, never accumulated
        return False


_EAGER_REASON = ("an oplora capture hook: it records X and sD eagerly between compiled graphs, so a model "
                 "with oplora-captured LoRA layers compiles with fullgraph=False")


def eager(fn):
    """``fn`` as a function torch.compile never traces (dynamo breaks the graph and calls it)."""
    disable = getattr(getattr(torch, "compiler", None), "disable", None)
    if disable is None:
        return fn
    try:
        return disable(fn, reason=_EAGER_REASON)
    except TypeError:  # a torch before disable(reason=)
        return disable(fn)
