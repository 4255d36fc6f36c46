"""Helpers of the capture hooks (``oplora.capture``): whether a running backward pass
accumulates into a parameter, hooks that torch.compile never traces, and hooks that pickle."""

from __future__ import annotations

import torch

__all__ = ["accumulates", "eager", "Hook", "Inert"]


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


class Inert:
    """A hook that does nothing: what a capture :class:`Hook` becomes in a pickled or deep-copied
    model, which then runs as a plain module (it neither feeds nor disturbs the optimizer)."""

    __slots__ = ()

    def __call__(self, *args, **kwargs):
        return None

    def __repr__(self) -> str:
        return "oplora.Inert()"


class Hook:
    """A capture hook (``fn``, a closure over the optimizer's capture) that pickles.

    ``torch.save(model)``, ``pickle`` and multiprocessing's spawn pickle a module's hooks along with
    it; a closure cannot be pickled, and a copy of the capture in another process would have no
    optimizer to feed. So a Hook pickles (and deep-copies) as an :class:`Inert` one.
    """

    __slots__ = ("fn",)

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __reduce__(self):
        return Inert, ()

    def __repr__(self) -> str:
        return "oplora.Hook()"
