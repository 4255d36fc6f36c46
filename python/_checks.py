"""Small helpers every layer of the package shares: grouping by a key, the non-finite scan, and
the checks of hyper-parameters. A leaf module: it imports nothing of the package.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Callable, Dict, Hashable, List, Optional, Sequence, TypeVar

import torch
from torch import Tensor

__all__ = ["group_by", "first_nonfinite", "check_real", "check_int", "check_choice", "check_bool", "check_all"]

T = TypeVar("T")


def group_by(items: Sequence[T], key: Callable[[T], Hashable]) -> Dict[Hashable, List[int]]:
    """The indices of ``items`` by ``key(item)``, each list in order, keys in order of first
    appearance."""
    groups: Dict[Hashable, List[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(key(item), []).append(i)
    return groups


def first_nonfinite(tensors: Sequence[Tensor]) -> Optional[int]:
    """Index of the first tensor holding a NaN or Inf, or None when all are finite.

    Fast path: the 1-norms of all tensors of one device and dtype by one ``torch._foreach_norm``
    (a NaN or Inf anywhere makes a norm non-finite), one host sync per device; only when a norm
    is not finite (a bad value, or an overflowing sum of huge values) are the tensors checked
    element by element.
    """
    by_device = group_by(tensors, lambda t: t.device)
    for index in by_device.values():
        by_dtype = group_by([tensors[i] for i in index], lambda t: t.dtype)
        verdicts = [torch.stack(torch._foreach_norm([tensors[index[i]] for i in sub], 1)).isfinite().all()
                    for sub in by_dtype.values()]
        if not bool(torch.stack(verdicts).all()):
            break
    else:
        return None
    for index, t in enumerate(tensors):
        if not bool(torch.isfinite(t).all()):
            return index
    return None


def check_real(value, name: str, *, low: float = -math.inf, high: float = math.inf,
               low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a float within the bounds, or a ValueError naming the hyper-parameter."""
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_complex():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    value = float(value)
    if value < low or value > high or (low_open and value == low) or (high_open and value == high):
        raise ValueError(f"{name} must be {_range(low, high, low_open, high_open)}, got {value!r}")
    return value


def _range(low: float, high: float, low_open: bool, high_open: bool) -> str:
    """The allowed range in words: "in [0, 1)", ">= 0", "> 0", "<= 1" (infinite ends are never allowed:
    only finite values pass :func:`check_real`)."""
    if high == math.inf and low == -math.inf:
        return "finite"
    if high == math.inf:
        return f"{'>' if low_open else '>='} {low:g}"
    if low == -math.inf:
        return f"{'<' if high_open else '<='} {high:g}"
    return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def check_bool(value, name: str) -> bool:
    """``value`` when it is a bool, or a ValueError naming the hyper-parameter."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool (True or False), got {value!r}")
    return value


def check_all(checks: Dict[str, Callable], values: Dict[str, object]) -> Dict[str, object]:
    """``{key: checks[key](value)}`` for every item of ``values``: each hyper-parameter validated by
    its check (which raises a ValueError naming it)."""
    return {key: checks[key](value) for key, value in values.items()}


def check_int(value, name: str, *, low: int = 0) -> int:
    """``value`` as an int ``>= low`` (not a bool), or a ValueError naming the hyper-parameter."""
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}") from None
    if value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def check_choice(value, name: str, choices: Sequence[str]) -> str:
    """``value`` when it is one of ``choices``, or a ValueError listing them."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")
    return value
