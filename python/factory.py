"""``oplora.create_optimizer``: build an oplora optimizer by name (PEFT-style factory).

For training scripts and configs that pick the optimizer with a string (a command-line flag, a
YAML field, a Hugging Face ``Trainer`` recipe) rather than importing a class.
"""

from __future__ import annotations

from typing import Dict, Type

from torch import nn

from .optim import OPLoRA, RiemannianLoRA, ScaledOPLoRA, SVDLoRA
from .optim.base import LoRAOptimizer

__all__ = ["create_optimizer", "OPTIMIZERS"]

#: name -> optimizer class. The class names, lower-cased, are accepted as well.
OPTIMIZERS: Dict[str, Type[LoRAOptimizer]] = {
    "oplora": OPLoRA,
    "scaled": ScaledOPLoRA,
    "svd": SVDLoRA,
    "riemannian": RiemannianLoRA,
}
_ALIASES: Dict[str, str] = {cls.__name__.lower(): name for name, cls in OPTIMIZERS.items()}


def create_optimizer(model: nn.Module, name: str = "oplora", **kwargs) -> LoRAOptimizer:
    """The oplora optimizer ``name`` built from ``model``: ``OPTIMIZERS[name](model, **kwargs)``.

    Args:
        model: the model holding the LoRA layers (``oplora.LoRALinear`` or PEFT ``lora.Linear``,
            e.g. from ``peft.get_peft_model``); the optimizer finds them itself.
        name: ``"oplora"`` (:class:`oplora.OPLoRA`), ``"scaled"`` (:class:`oplora.ScaledOPLoRA`),
            ``"svd"`` (:class:`oplora.SVDLoRA`) or ``"riemannian"`` (:class:`oplora.RiemannianLoRA`);
            the class names are accepted too, case-insensitively (``"ScaledOPLoRA"``).
        **kwargs: the class's own keyword arguments (``lr``, ``momentum``, ``other_kwargs``,
            ``master_factors``, ...), passed through unchanged and validated by the class. The
            other-parameter optimizer's lr defaults to its own default (AdamW's 1e-3) for
            ``"oplora"`` and ``"svd"``, whose ``lr`` is on SGD's scale, and to ``lr`` for
            ``"scaled"`` (Adam's scale); ``other_kwargs={"lr": ...}`` sets it.

    Returns the optimizer (a ``torch.optim.Optimizer``), ready for ``Trainer(optimizers=(opt,
    scheduler))`` or a hand-written loop. Nothing is modified on ``model`` other than the capture
    hooks the optimizer installs (removed by ``opt.close()``).

    Raises ``ValueError`` for an unknown ``name`` (listing the known ones) and whatever the
    class raises for its arguments (``ValueError`` naming the hyper-parameter, ``TypeError`` for
    an argument it does not take or a model that is not an ``nn.Module``).

    Example::

        model = peft.get_peft_model(base, peft.LoraConfig(r=16, target_modules=["q_proj", "v_proj"]))
        opt = oplora.create_optimizer(model, "scaled", lr=3e-3, other_kwargs={"lr": 1e-3})
    """
    if not isinstance(name, str):
        raise ValueError(f"name must be a string, one of {', '.join(map(repr, OPTIMIZERS))}; got {name!r}")
    key = name.lower()
    key = _ALIASES.get(key, key)
    if key not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer name {name!r}; known: {', '.join(map(repr, OPTIMIZERS))} "
                         f"(or the class names {', '.join(cls.__name__ for cls in OPTIMIZERS.values())})")
    return OPTIMIZERS[key](model, **kwargs)
