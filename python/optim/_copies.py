"""Copies of an optimizer: ``copy.deepcopy`` and ``pickle`` rebuild it on the copied model.

A ``torch.optim.Optimizer`` copies as its ``defaults``, ``state`` and ``param_groups`` only, so a
copied oplora optimizer would lack its capture and its layers (and fail at its first use). An
oplora optimizer is tied to its model instead -- it found the LoRA layers in it and hooks them --
so a copy is rebuilt: the same class, built with the same arguments on the copy of the model,
then loaded with the original's ``state_dict()`` (hyper-parameters as they are now, seed,
momentum, statistics, the other optimizer's state). Hence:

* ``copy.deepcopy({"model": model, "opt": opt})``: the copied optimizer trains the copied model
  (the model's copy in the same ``deepcopy`` call is used; ``copy.deepcopy(opt)`` alone copies the
  model too, as a torch optimizer copies its parameters);
* ``torch.save({"model": model, "opt": opt})`` / ``pickle``: the same on loading. The capture
  hooks of the model pickle as inert ones (``oplora.capture.hooks.Hook``): a model pickled or copied
  alone -- ``torch.save(model)``, multiprocessing's spawn -- runs as a plain module.

What was captured and not yet stepped is not copied (it belongs to the original's backward).
"""

from __future__ import annotations

import copy
from typing import Any, Dict, Tuple

from torch import nn

__all__ = ["CopyMixin", "rebuild"]


def rebuild(cls: type, model: nn.Module, args: Tuple, kwargs: Dict[str, Any], state: dict):
    """``cls(model, *args, **kwargs)`` loaded with ``state`` (a ``state_dict()``). The copy holds
    its model (an optimizer built by the user holds only a weak reference to its model): a model
    copied or unpickled along with the optimizer alone has no other owner."""
    opt = cls(model, *args, **kwargs)
    opt.load_state_dict(state)
    opt._model_copy = model
    return opt


class CopyMixin:
    """Records the constructor's arguments (``__new__``) and copies by :func:`rebuild`."""

    def __new__(cls, model=None, *args, **kwargs):
        obj = super().__new__(cls)
        obj._init_args = (args, dict(kwargs))
        return obj

    def _model_or_refuse(self, what: str) -> nn.Module:
        model = self._model()
        if model is None:
            raise RuntimeError(f"{type(self).__name__} cannot be {what}: the model it was built from is gone")
        return model

    def __reduce__(self):
        args, kwargs = self._init_args
        return rebuild, (type(self), self._model_or_refuse("pickled"), args, kwargs, self.state_dict())

    def __deepcopy__(self, memo: dict):
        original = self._model_or_refuse("copied")
        model = copy.deepcopy(original, memo)  # the copy already made in this deepcopy call, if any
        args, kwargs = self._init_args
        state = copy.deepcopy(self.state_dict(), memo)
        out = rebuild(type(self), model, copy.deepcopy(args, memo), copy.deepcopy(kwargs, memo), state)
        memo[id(self)] = out
        return out
