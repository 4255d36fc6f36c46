"""The optimizers a study compares, by name: the table (:data:`OPTIMIZERS`), names with keyword
arguments in brackets (:func:`split_name`, :func:`build_optimizer`), and the 1-3-10 ladder the lr
grids are drawn on (:func:`half_decades`)."""

from __future__ import annotations

import math
import re
from typing import Callable, Dict, List, Tuple

import torch
from torch import nn

import oplora

HALF_DECADE = math.sqrt(10.0)


def _trainable(model: nn.Module) -> List[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _adamw(model: nn.Module, lr: float, seed: int, **kw) -> torch.optim.Optimizer:
    return torch.optim.AdamW(_trainable(model), lr=lr, weight_decay=0.0, **kw)


def _loraplus(model: nn.Module, lr: float, seed: int, **kw) -> torch.optim.Optimizer:
    from peft.optimizers import create_loraplus_optimizer

    kw.setdefault("loraplus_lr_ratio", 16.0)  # the LoRA+ paper's and PEFT's documented choice
    return create_loraplus_optimizer(model, torch.optim.AdamW, lr=lr, weight_decay=0.0, **kw)


def _riemannian(model: nn.Module, lr: float, seed: int, **kw) -> torch.optim.Optimizer:
    from peft.optimizers import create_riemannian_optimizer

    return create_riemannian_optimizer(model, torch.optim.AdamW, lr=lr, weight_decay=0.0, **kw)


def _oplora(kind: str, **defaults) -> Callable[..., torch.optim.Optimizer]:
    def build(model: nn.Module, lr: float, seed: int, **kw) -> torch.optim.Optimizer:
        args = {**defaults, **kw}
        if kind != "svd":
            args.setdefault("seed", seed)
        return oplora.create_optimizer(model, kind, lr=lr, **args)
    return build


# name -> builder(model, lr, seed, **variant). Each is what its documentation tells a user to
# write; nothing but the LoRA factors (and a task's head) is trainable.
OPTIMIZERS: Dict[str, Callable[..., torch.optim.Optimizer]] = {
    "AdamW": _adamw,
    "LoRA+": _loraplus,
    "Riemannian": _riemannian,
    "OPLoRA": _oplora("oplora", momentum=0.9),
    "ScaledOPLoRA": _oplora("scaled"),
    "SVDLoRA": _oplora("svd", momentum=0.9),
}


_ITEMS = re.compile(r",(?![^()]*\))")  # commas outside parentheses


def _parse_value(text: str):
    if text.startswith("(") and text.endswith(")"):  # a tuple, e.g. betas=(0.9,0.99)
        return tuple(_parse_value(item.strip()) for item in _ITEMS.split(text[1:-1]) if item.strip())
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def split_name(name: str) -> Tuple[str, Dict[str, object]]:
    """``"OPLoRA[start=B,iters=2]"`` -> ``("OPLoRA", {"start": "B", "iters": 2})``; a value in
    parentheses is a tuple: ``"ScaledOPLoRA[betas=(0.9,0.99)]"``."""
    match = re.fullmatch(r"([^\[\]]+)(?:\[(.*)\])?", name)
    if not match or match.group(1) not in OPTIMIZERS:
        raise SystemExit(f"unknown optimizer {name!r}: one of {', '.join(OPTIMIZERS)}, optionally with "
                         "keyword arguments in brackets, e.g. OPLoRA[start=B,iters=2]")
    kwargs = {}
    for item in filter(None, _ITEMS.split(match.group(2) or "")):
        key, _, value = item.partition("=")
        kwargs[key.strip()] = _parse_value(value.strip())
    return match.group(1), kwargs


def build_optimizer(name: str, model: nn.Module, lr: float, seed: int) -> torch.optim.Optimizer:
    base, kwargs = split_name(name)
    return OPTIMIZERS[base](model, lr, seed, **kwargs)


def half_decades(low: float, count: int) -> Tuple[float, ...]:
    """``count`` lrs from ``low`` upwards, half a decade apart, on the 1-3-10 ladder
    (``half_decades(3e-4, 4) == (3e-4, 1e-3, 3e-3, 1e-2)``)."""
    out = []
    for i in range(count):
        value = low * HALF_DECADE ** i
        exp = math.floor(math.log10(value) + 1e-9)
        mantissa = value / 10 ** exp
        out.append(float(f"{(1 if mantissa < 2 else 3 if mantissa < 6 else 10) * 10 ** exp:.0e}"))
    return tuple(out)
