"""The oplora optimizers: ``OPLoRA``, ``ScaledOPLoRA`` and the baselines ``SVDLoRA``, ``RiemannianLoRA``.

All are ``torch.optim.Optimizer`` subclasses built from a model (SPEC section 3): they find its
LoRA layers, capture X and sD during forward/backward, update the LoRA factors at ``step()``,
and train every other trainable parameter with AdamW (or another torch optimizer). The math is
one functional core, ``oplora.optim.functional``.

This layer sits on the capture layer (``oplora.capture``: what each LoRA layer saw) and the
backends (``oplora.backends``: which implementation runs an op). Its modules:

* ``base`` -- :class:`LoRAOptimizer`, the base class (param groups, state, the order of a step),
  with its mixins ``_context`` (guards, unscaling, clipping: the step's context), ``_stepping``
  (every reached layer planned, solved together, committed all or none) and ``_copies``;
* ``oplora`` (``OPLoRA``, ``ScaledOPLoRA``) and ``baselines`` (``SVDLoRA``, ``RiemannianLoRA``):
  short subclasses that plan a layer's step;
* ``functional`` (a layer's step as engine problems), ``statistics`` (ScaledOPLoRA's metric),
  ``clipping``; ``engine`` (the problems of all layers solved in lockstep passes over their rows)
  and ``problems`` (what the engine is given);
* the guards and the stacks: ``_guards``, ``_checkpoint`` (``load_state_dict``), ``_distributed``
  (DDP), ``_fsdp`` (FSDP2), ``_masters`` (float32 master factors), ``_inner`` (the other
  parameters' optimizer), ``_summary`` (``print(opt)``).
"""

from .base import LoRAOptimizer
from .baselines import RiemannianLoRA, SVDLoRA
from .oplora import OPLoRA, ScaledOPLoRA

__all__ = ["LoRAOptimizer", "OPLoRA", "ScaledOPLoRA", "SVDLoRA", "RiemannianLoRA"]
