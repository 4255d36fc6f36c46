"""``oplora.LoRALinear`` and ``oplora.add_lora``: LoRA for plain PyTorch models, no PEFT needed.

The layer computes ``y = W0 x + s * B (A dropout(x))`` (SPEC section 1) with the same module
structure as a PEFT ``lora.Linear`` (``base_layer``, ``lora_A``, ``lora_B``, ``lora_dropout``,
``scaling``), so that capture (``oplora.capture``) treats both the same way: X is the input of
``lora_A`` and ``s D`` the gradient at the output of ``lora_B``.
"""

from __future__ import annotations

import math
import re
from typing import Callable, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

__all__ = ["LoRALinear", "add_lora"]


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable rank-``r`` update: ``y = W0 x + s B A dropout(x)``.

    Args:
        base: the layer to adapt (m = ``out_features``, n = ``in_features``). Its weight and bias
            are frozen (``requires_grad=False``) and kept as ``self.base_layer``.
        r: the rank (>= 1).
        alpha: the LoRA alpha; ``s = alpha / r`` (``alpha / sqrt(r)`` with ``rslora=True``).
            Default ``alpha = r`` (s = 1).
        dropout: dropout probability applied to the input of the LoRA branch only.
        rslora: rank-stabilised scaling ``s = alpha / sqrt(r)``.

    Parameters: ``lora_A.weight`` (r x n, Kaiming-uniform as in PEFT) and ``lora_B.weight``
    (m x r, zeros, so the model is unchanged at initialisation), in the base layer's dtype and
    device.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: Optional[float] = None, dropout: float = 0.0,
                 *, rslora: bool = False):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"r must be a positive int, got {r!r}")
        alpha = float(r if alpha is None else alpha)
        if not math.isfinite(alpha) or alpha <= 0:
            raise ValueError(f"alpha must be a positive finite number, got {alpha!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.base_layer = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.r = r
        self.alpha = alpha
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        self.lora_dropout = nn.Dropout(float(dropout)) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(base.in_features, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, **factory)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def forward(self, x: Tensor) -> Tensor:
        return self.base_layer(x) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A new ``nn.Linear`` with weight ``W0 + s B A`` (for inference; this module is unchanged)."""
        base = self.base_layer
        out = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                        device=base.weight.device, dtype=base.weight.dtype)
        # float32 for low-precision weights, float64 for float64 ones (the package's policy).
        dtype = torch.float64 if base.weight.dtype == torch.float64 else torch.float32
        delta = (self.lora_B.weight.to(dtype) @ self.lora_A.weight.to(dtype)) * self.scaling
        out.weight.copy_(base.weight.to(dtype) + delta)
        if base.bias is not None:
            out.bias.copy_(base.bias)
        return out

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}"


Target = Union[str, Sequence[str], Callable[[str, nn.Module], bool]]


def _matcher(target_modules: Target) -> Callable[[str, nn.Module], bool]:
    if callable(target_modules):
        return target_modules
    if isinstance(target_modules, str):
        pattern = re.compile(target_modules)
        return lambda name, _: pattern.fullmatch(name) is not None
    names = list(target_modules)
    if not names or not all(isinstance(t, str) and t for t in names):
        raise ValueError(f"target_modules must be a regex, a callable or a non-empty list of names, got {target_modules!r}")
    return lambda name, _: any(name == t or name.endswith("." + t) for t in names)


def add_lora(model: nn.Module, target_modules: Target, r: int = 8, alpha: Optional[float] = None,
             dropout: float = 0.0, *, rslora: bool = False, freeze_base: bool = True) -> List[str]:
    """Replace the matching ``nn.Linear`` submodules of ``model`` by :class:`LoRALinear`, in place.

    Args:
        model: any ``nn.Module``.
        target_modules: which submodules to adapt: a list of names, each matching a module's full
            dotted name or its last components (``["q_proj", "v_proj"]`` as in PEFT); a regex
            string matched against the full name; or a callable ``(name, module) -> bool``.
        r, alpha, dropout, rslora: as in :class:`LoRALinear`.
        freeze_base: freeze every parameter the model had before (PEFT's behaviour); unfreeze a
            head afterwards with ``requires_grad_(True)`` to train it (the optimizers train it
            with their ``other`` optimizer).

    Returns the names of the adapted modules. Raises ``ValueError`` when nothing matches, and
    ``TypeError`` when a matched module is not an ``nn.Linear`` (LoRA on other module types is
    not supported by this helper).
    """
    match = _matcher(target_modules)
    if freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
    chosen = []
    for name, module in model.named_modules():
        if not name or isinstance(module, LoRALinear) or not match(name, module):
            continue
        if any(name.startswith(c + ".") for c in chosen):
            continue  # inside a module already adapted
        if not isinstance(module, nn.Linear):
            raise TypeError(f"add_lora: module {name!r} matches target_modules but is a "
                            f"{type(module).__name__}, not an nn.Linear")
        chosen.append(name)
    if not chosen:
        raise ValueError(f"add_lora: no submodule of {type(model).__name__} matches target_modules={target_modules!r}")
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(getattr(parent, child), r, alpha, dropout, rslora=rslora))
    return chosen
