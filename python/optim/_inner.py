"""The torch optimizers the LoRA optimizers hand work to: AdamW (or another) for the other
trainable parameters, and RiemannianLoRA's base optimizer for the factors. Each shares the LoRA
optimizer's param group dict and its ``state`` (:func:`share`), so schedulers and
``state_dict()`` see one optimizer.
"""

from __future__ import annotations

import inspect
from typing import List, Optional, Type, Union

import torch
from torch import nn

__all__ = ["OtherSpec", "resolve", "build", "share", "follow_momentum"]

OtherSpec = Union[str, Type[torch.optim.Optimizer]]
_OTHER = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD, "adam": torch.optim.Adam}


def resolve(spec: OtherSpec, what: str) -> Type[torch.optim.Optimizer]:
    """The optimizer class ``spec`` names (a name in ``_OTHER`` or an Optimizer subclass)."""
    if isinstance(spec, str) and spec.lower() in _OTHER:
        return _OTHER[spec.lower()]
    if isinstance(spec, type) and issubclass(spec, torch.optim.Optimizer):
        return spec
    raise ValueError(f"{what} must be one of {', '.join(map(repr, _OTHER))} or a "
                     f"torch.optim.Optimizer subclass, got {spec!r}")


def build(spec: OtherSpec, params: List[nn.Parameter], lr: Optional[float], kwargs: Optional[dict],
          what: str) -> torch.optim.Optimizer:
    """A torch optimizer over ``params`` (``spec`` a name in ``_OTHER`` or an Optimizer class);
    ``lr`` is its learning rate unless ``kwargs`` has one (None: the class's own default, e.g.
    AdamW's 1e-3)."""
    cls = resolve(spec, what)
    if kwargs is not None and not isinstance(kwargs, dict):
        raise ValueError(f"{what}_kwargs must be a dict, got {type(kwargs).__name__}")
    kwargs = dict(kwargs or {})
    if lr is not None:
        kwargs.setdefault("lr", lr)
    try:
        return cls(params, **kwargs)
    except (TypeError, ValueError) as err:
        hint = ""
        if "lr" not in kwargs and not _has_default_lr(cls):
            hint = f" (it has no default lr: pass {what}_kwargs={{'lr': ...}})"
        raise ValueError(f"{what}={cls.__name__} rejected {what}_kwargs={kwargs!r}{hint}: {err}") from err


def _has_default_lr(cls: Type[torch.optim.Optimizer]) -> bool:
    """Whether ``cls(params)`` has an lr without being given one."""
    try:
        lr = inspect.signature(cls).parameters.get("lr")
    except (TypeError, ValueError):  # no signature to read: assume it has
        return True
    return lr is None or lr.default is not inspect.Parameter.empty


def share(inner: torch.optim.Optimizer, group: dict, state) -> torch.optim.Optimizer:
    """Make ``inner`` work on ``group`` (the owner's dict, which takes ``inner``'s defaults it
    lacks) and on the owner's ``state``; returns ``inner``."""
    (inner_group,) = inner.param_groups
    for key, value in inner_group.items():
        if key != "params":
            group.setdefault(key, value)
    inner.param_groups = [group]
    inner.state = state
    return inner


def follow_momentum(inner: torch.optim.Optimizer) -> None:
    """Momentum written by a scheduler under the other family's name, taken in.

    ``OneCycleLR`` and ``CyclicLR`` (``cycle_momentum=True``) write every param group's
    ``"momentum"`` when the owner's ``defaults`` has one (OPLoRA), else every group's
    ``"betas"`` first value (ScaledOPLoRA, RiemannianLoRA with base AdamW). A group whose
    optimizer reads the other name (AdamW's ``betas`` for the other parameters of OPLoRA; SGD's
    ``momentum`` beside ScaledOPLoRA) would keep its momentum fixed and carry a dead key: so
    before ``inner`` steps, its ``betas[0]`` follows a written ``"momentum"``, or its
    ``"momentum"`` follows written ``"betas"``.
    """
    uses = inner.defaults
    for group in inner.param_groups:
        if "betas" in uses and "momentum" not in uses and "momentum" in group:
            group["betas"] = (group["momentum"], *tuple(group["betas"])[1:])
        elif "momentum" in uses and "betas" not in uses and "betas" in group:
            group["momentum"] = tuple(group["betas"])[0]
