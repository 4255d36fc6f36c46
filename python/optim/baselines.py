"""Baselines with the same interface and capture: ``SVDLoRA`` (the ideal) and ``RiemannianLoRA``."""

from __future__ import annotations

from typing import Dict, Optional, Tuple

from torch import nn

from .._checks import check_all, check_choice, check_real
from .._dtensor import local
from . import _fsdp, _inner
from . import functional as F
from ._inner import OtherSpec
from .base import LoRAOptimizer
from ..capture.sites import LoRASite

__all__ = ["SVDLoRA", "RiemannianLoRA"]


class SVDLoRA(LoRAOptimizer):
    """SVDLoRA: ``B A <- best rank-r approximation of (B A - lr G)`` by a truncated SVD.

    The accuracy ideal OPLoRA approximates, at the cost it avoids: per layer it forms the m x n
    matrix ``B A - lr M`` (``M = G = sD^T X``, or with ``momentum > 0`` the heavy-ball buffer
    ``M <- momentum M + G``, an m x n state) and runs a full SVD; balanced factors
    ``B = U_r S_r^1/2``, ``A = S_r^1/2 V_r^T``. Other parameters (their optimizer's lr defaults to
    its own default: ``lr`` is on SGD's scale), ``max_grad_norm``, ``skip_nonfinite``,
    ``capture``, ``master_factors``: as in :class:`OPLoRA`. Refused on several data-parallel ranks
    (``NotImplementedError``): the step needs every rank's m x n gradient.
    """

    def __init__(self, model: nn.Module, lr: float = 1e-3, *, momentum: float = 0.0,
                 other: OtherSpec = "adamw", other_kwargs: Optional[dict] = None, strict: bool = False,
                 max_grad_norm: Optional[float] = None, skip_nonfinite: bool = False, process_group=None,
                 capture: str = "auto", master_factors: bool = False):
        defaults = check_all(self.HYPER_CHECKS, dict(lr=lr, momentum=momentum))
        super().__init__(model, defaults, other=other, other_kwargs=other_kwargs, strict=strict,
                         max_grad_norm=max_grad_norm, skip_nonfinite=skip_nonfinite, process_group=process_group,
                         capture=capture, master_factors=master_factors)

    HYPER_CHECKS = {
        **LoRAOptimizer.HYPER_CHECKS,
        "lr": lambda v: check_real(v, "lr", low=0.0),
        "momentum": lambda v: check_real(v, "momentum", low=0.0, high=1.0, high_open=True),
    }

    def _state_spec(self, site: LoRASite, group: dict) -> Dict[str, Optional[Tuple[int, ...]]]:
        spec = super()._state_spec(site, group)
        if float(group["momentum"]) != 0.0:
            spec["momentum_buffer"] = site.shape
        return spec

    def _plan(self, index, site, factors, chunks, folded, state, group, ctx: F.StepContext) -> F.Plan:
        b, a = factors
        return F.plan_svd(b, a, self._fold_all(site), state, lr=float(group["lr"]),
                          momentum=float(group["momentum"]), grad_coeff=ctx.grad_coeff)

    def _distributed_unsupported(self, defaults):
        return ("SVDLoRA forms each layer's m x n step, so it would need the m x n gradient of every "
                "rank; use OPLoRA, ScaledOPLoRA or RiemannianLoRA for data-parallel training")


class RiemannianLoRA(LoRAOptimizer):
    """Riemannian (scaled-GD) LoRA: preconditioned factor gradients, then a base optimizer.

    ``grad_A <- (B^T B + damping I)^-1 grad_A`` and ``grad_B <- grad_B (A A^T + damping I)^-1``,
    both from the factors before the step, then ``base`` (``"sgd"`` or ``"adamw"``, with
    ``base_kwargs``) steps the factors -- with SGD this is LoRSum's ``iters = 0`` family.

    It works from the factor gradients autograd already computes (``grad_A = B^T G``,
    ``grad_B = G A^T``), so it installs no capture hooks and gradient accumulation is autograd's;
    a layer whose factors have no gradient is left untouched. The preconditioned gradients are
    written into ``A.grad``/``B.grad`` before the base step. Other parameters: as in
    :class:`OPLoRA`; the base optimizer's hyper-parameters live in the LoRA param group.

    ``max_grad_norm`` clips as ``torch.nn.utils.clip_grad_norm_`` over every ``.grad`` (the factor
    gradients included: they are what this optimizer steps from), before the preconditioning.
    Under DDP the factor gradients are already averaged, so it needs no reduction of its own
    (clipping included). Under FSDP2 (sharded factors) the factors and gradients are gathered for
    the r x r solves and each rank writes its rows of the result into its gradient shards; the
    base optimizer then steps the shards (its state sharded as for any FSDP2 parameter); clip
    there with ``torch.nn.utils.clip_grad_norm_`` (``max_grad_norm`` is refused: the norm of
    sharded gradients needs a reduction this optimizer does not make).
    An adapter frozen at a step is not stepped, whatever its ``.grad`` holds.
    The other optimizer's lr defaults to ``lr`` with ``base="adamw"`` (Adam's scale) and to its
    own default with ``base="sgd"``.
    """

    uses_capture = False

    def __init__(self, model: nn.Module, lr: float = 1e-3, *, base: str = "sgd", damping: float = 1e-6,
                 base_kwargs: Optional[dict] = None, other: OtherSpec = "adamw",
                 other_kwargs: Optional[dict] = None, strict: bool = False,
                 max_grad_norm: Optional[float] = None, skip_nonfinite: bool = False, process_group=None):
        defaults = check_all(self.HYPER_CHECKS, dict(lr=lr, damping=damping, base=base))
        super().__init__(model, defaults, other=other, other_kwargs=other_kwargs, strict=strict,
                         max_grad_norm=max_grad_norm, skip_nonfinite=skip_nonfinite, process_group=process_group)
        lora = self.lora_group
        inner = _inner.build(base, list(lora["params"]), defaults["lr"], base_kwargs, "base")
        self._inner["lora"] = _inner.share(inner, lora, self.state)
        # The base optimizer's hyper-parameters are this optimizer's too: schedulers that cycle
        # momentum (OneCycleLR, CyclicLR) look for "betas" or "momentum" in ``defaults``.
        for key, value in inner.defaults.items():
            self.defaults.setdefault(key, value)

    HYPER_CHECKS = {
        **LoRAOptimizer.HYPER_CHECKS,
        "lr": lambda v: check_real(v, "lr", low=0.0),
        "damping": lambda v: check_real(v, "damping", low=0.0, low_open=True),
        "base": lambda v: check_choice(v, "base", ("sgd", "adamw")),
    }

    def _other_shares_lr(self, defaults: dict) -> bool:
        return defaults["base"] == "adamw"

    def _distributed_unsupported(self, defaults: dict) -> Optional[str]:
        if self._sharded and defaults.get("max_grad_norm") is not None:
            return ("max_grad_norm with FSDP2-sharded factors: the norm of sharded gradients needs a reduction "
                    "this optimizer does not make; clip with torch.nn.utils.clip_grad_norm_(model.parameters(), "
                    "max_norm) before step(), which reduces the norm of DTensor gradients over the mesh")
        return super()._distributed_unsupported(defaults)

    def _step_lora(self, ctx: F.StepContext) -> bool:
        """Precondition every trainable layer's factor gradients, then step the base optimizer,
        the frozen layers' gradients hidden from it (``ctx`` is not needed: autograd's gradients
        are already unscaled, clipped and averaged)."""
        damping = float(self.lora_group["damping"])
        hidden = [(p, p.grad) for site in self._sites if not site.trainable for p in (site.A, site.B)
                  if p.grad is not None]
        stepped = [i for i, site in enumerate(self._sites)
                   if site.A.grad is not None and site.B.grad is not None and site.trainable]
        # FSDP2: the factors and their gradients gathered whole (one all-gather), each rank's rows
        # of the preconditioned gradients written back into its gradient shards.
        tensors, layouts = [], []
        for i in stepped:
            site = self._sites[i]
            tensors += [site.B, site.A, site.B.grad, site.A.grad]
            layouts += [self._layouts[i]] * 4
        whole = iter(_fsdp.gather(tensors, layouts))
        for i in stepped:
            site, lay = self._sites[i], self._layouts[i]
            b, a, grad_b, grad_a = (next(whole) for _ in range(4))
            # Conv factors as matrices (the flattened kernel): the gradients reshaped alike.
            mat_b, mat_a = b.reshape(b.shape[0], -1), a.reshape(a.shape[0], -1)
            grad_b, grad_a = F.riemannian_precondition(mat_b, mat_a, grad_b.reshape(mat_b.shape),
                                                       grad_a.reshape(mat_a.shape), damping)
            if lay is None:
                site.B.grad, site.A.grad = grad_b.view(site.B.shape), grad_a.view(site.A.shape)
                continue
            for p, new in ((site.B, grad_b), (site.A, grad_a)):
                lo, hi = lay.rows(new.shape[0])
                mine = local(p.grad)
                mine.copy_(new[lo:hi].view(mine.shape))
        for p, _ in hidden:
            p.grad = None
        try:
            _inner.follow_momentum(self._inner["lora"])
            self._inner["lora"].step()
        finally:
            for p, grad in hidden:
                p.grad = grad
        return True
