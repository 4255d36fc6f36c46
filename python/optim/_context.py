"""What a step checks and measures before anything moves: the step's context.

:class:`ContextMixin` gives :class:`~oplora.optim.base.LoRAOptimizer` its ``_context()``: in
order, the model's structure (``_guards.check_model``), GradScaler's verdict and scale, what is
captured brought in line with the factors' ``.grad`` (``oplora.capture.lifetime``: rows of discarded
gradients dropped, a uniform rescale taken in, frozen adapters dropped), the refusals that name a
layer (nothing captured for reached factors, second-order terms, devices, NaN/Inf; agreed by
every rank under data parallelism), unscaling and clipping. The result is one
:class:`~oplora.optim.functional.StepContext`, or None for a skipped step.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import _distributed, _guards, clipping
from . import functional as F

__all__ = ["ContextMixin"]


def _mul(tensors: List[Tensor], coeff: float) -> None:
    for t in tensors:
        t.mul_(coeff)


class ContextMixin:
    """The context of a step, for :class:`~oplora.optim.base.LoRAOptimizer` (which holds the
    attributes read here: ``_sites``, ``_capture``, ``_model``, ``_group_arg``, ``_group``,
    ``_names``, ``uses_capture``, ``skip_nonfinite``...)."""

    def _context(self) -> Optional[F.StepContext]:
        """Guards, unscaling and clipping: the context of this step, or None when it is skipped."""
        name = type(self).__name__
        _guards.check_model(name, self._model(), self._sites, self.lora_group["params"],
                            [p for g in self.param_groups for p in g["params"]])
        inv_scale, unscaled = self._amp_inverse_scale()
        self._grad_norm = None
        if inv_scale is None:  # GradScaler found inf/NaN: skip the step, as torch optimizers do
            return None
        group = _distributed.resolve_group(self._group_arg)
        if group is not self._group:
            raise RuntimeError(f"{name} was built before torch.distributed was initialized (or the process "
                               "group changed since): build the optimizer after init_process_group, so that "
                               "every rank starts from the same state")
        if self._capture is not None:
            self._capture.watch()
            # unscale_ writes .grad without bumping versions, and so may writes through a DTensor
            # (FSDP2) into its shard: compare the values themselves then.
            self._capture.sync(force=unscaled or self._sharded)
            self._capture.release_frozen()
            self._capture.settle()
        rows = [site.rows for site in self._sites]
        error, bad, world = None, None, 1
        try:
            if self.uses_capture:
                _guards.check_captured(name, self._sites)
                _guards.check_second_order(name, self._sites, distributed=group is not None)
            bad = self._find_nonfinite(rows=False)  # the rows: checked on the step's products
        except RuntimeError as err:
            if group is None:
                raise
            error = err  # raised once every rank knows, so that none is left waiting in a collective
        if group is not None:
            world = torch.distributed.get_world_size(group)
            bad, rows = _distributed.agree(name, group, error, bad, rows, self._sites[0].B.device)
        if bad is not None:
            return self._nonfinite(f"{bad} holds NaN or Inf")
        if inv_scale != 1.0:
            _mul([p.grad for g in self.param_groups for p in g["params"] if p.grad is not None], inv_scale)
        # The .grad the step reads: the other group's (captured optimizers), or every group's (trainable factors).
        stepped = [p.grad for g in self.param_groups[1 if self.uses_capture else 0:] for p in g["params"]
                   if p.grad is not None and (p.requires_grad or g["kind"] != "lora")]
        coeff = inv_scale
        max_norm = self.lora_group["max_grad_norm"]
        if max_norm is not None:
            reason = self._distributed_unsupported(self.lora_group) if group is not None else None
            if reason is not None:
                raise NotImplementedError(f"{name} with {world} data-parallel ranks: {reason}")
            total = clipping.total_norm(self._sites if self.uses_capture else [], stepped, inv_scale)
            if not math.isfinite(total):
                return self._nonfinite(f"the total gradient norm overflowed ({total})")
            self._grad_norm = total
            clip = min(1.0, float(max_norm) / (total + 1e-6))
            if clip < 1.0:
                _mul(stepped, clip)
                coeff *= clip
        if group is None:
            return F.StepContext(grad_coeff=coeff)
        return F.StepContext(grad_coeff=coeff / world, rows=dict(enumerate(rows)),
                             reduce=lambda tensors: _distributed.all_reduce_sum(tensors, group))

    def _find_nonfinite(self, rows: bool) -> Optional[str]:
        """:func:`oplora.optim._guards.find_nonfinite` over this optimizer's layers, state and other
        gradients; with ``rows=False`` a bad other gradient is named after a full scan, which may
        find a bad row first (a NaN in the rows makes every later gradient NaN too)."""
        others = [(self._names.get(id(p), "?"), p.grad) for g in self.param_groups[1:] for p in g["params"]
                  if p.grad is not None]
        scan = lambda full: _guards.find_nonfinite(type(self).__name__, self._sites, self.uses_capture,  # noqa: E731
                                                   self.state, others, rows=full)
        bad = scan(rows)
        return scan(True) if bad is not None and not rows else bad

    def _nonfinite(self, what: str) -> None:
        """Skip the step (``skip_nonfinite``; returns None, falsy) or raise FloatingPointError saying
        ``what``."""
        if not self.skip_nonfinite:
            raise FloatingPointError(f"{type(self).__name__}: {what}; nothing was updated "
                                     "(skip_nonfinite=True skips such steps instead)")
        self.skipped_steps += 1
        return None

    def _amp_inverse_scale(self) -> Tuple[Optional[float], bool]:
        """1 / loss scale set by GradScaler.step (1.0 without one; None when it found inf/NaN), and
        whether ``scaler.unscale_(opt)`` ran before (``.grad`` unscaled already, and through the
        factors' gradients the captured sD: ``oplora.capture.lifetime``)."""
        found_inf = getattr(self, "found_inf", None)
        if found_inf is None:
            return 1.0, False
        if float(found_inf) > 0:
            return None, False
        scale = getattr(self, "grad_scale", None)
        if scale is None:
            return 1.0, True
        return 1.0 / float(scale), False
