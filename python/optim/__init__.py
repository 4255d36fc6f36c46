"""The oplora optimizers: ``OPLoRA``, ``ScaledOPLoRA`` and the baselines ``SVDLoRA``, ``RiemannianLoRA``.

All are ``torch.optim.Optimizer`` subclasses built from a model (SPEC section 3): they find its
LoRA layers, capture X and sD during forward/backward, update the LoRA factors at ``step()``,
and train every other trainable parameter with AdamW (or another torch optimizer). The math is
one functional core, ``oplora.optim.functional``.
"""

from .base import LoRAOptimizer
from .baselines import RiemannianLoRA, SVDLoRA
from .oplora import OPLoRA, ScaledOPLoRA

__all__ = ["LoRAOptimizer", "OPLoRA", "ScaledOPLoRA", "SVDLoRA", "RiemannianLoRA"]
