"""``LoRAOptimizer``: the small base class every oplora optimizer is a short subclass of.

Like ``torch.optim.Optimizer`` itself, the class gathers state and fixes the order of a step;
the math is elsewhere (SPEC section 3):

* param groups: group 0 (``kind="lora"``) holds every LoRA factor, ``A`` then ``B`` per layer,
  with the optimizer's hyper-parameters; group 1 (``kind="other"``, present when the model has
  any) every other trainable parameter (biases, heads, norms, LoRA factors of unsupported
  layers), trained by a torch optimizer (AdamW by default) that shares this group dict and this
  ``state``. So LR schedulers, ``state_dict()`` and ``load_state_dict()`` cover everything;
* per-layer state keyed by the layer's ``B`` factor, tensors and plain values only;
* the LoRA layers (``oplora.capture``) and, for the optimizers that need X and sD, the hooks.

A step, in order (:meth:`step`): the guards (``_guards``: model unchanged, devices, NaN/Inf;
every rank agreeing under data parallelism, ``_distributed``), GradScaler unscaling and clipping
(``clipping``) -- which give the step's :class:`~oplora.optim.functional.StepContext`, passed
down as an argument -- then the LoRA layers (:meth:`_step_lora`), then the other parameters.

Subclasses set their hyper-parameters (validated) in ``defaults`` and either implement
``_plan(index, site, chunks, folded, state, group, ctx) -> Plan`` (a layer's update from its
captured rows and the rows folded into its dense gradient; the default :meth:`_step_lora` solves every reached layer's plan together in the step
engine and commits all or none) or override :meth:`_step_lora` (RiemannianLoRA, which steps from
autograd's factor gradients and sets ``uses_capture = False``).
"""

from __future__ import annotations

import math
import weakref
from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

from .._checks import check_choice
from ..capture import CAPTURE_MODES, Capture
from ..reference import compute_dtype
from ..sites import Folded, LoRASite
from . import _distributed, _guards, _inner, clipping, engine
from . import functional as F
from ._inner import OtherSpec

__all__ = ["LoRAOptimizer"]


def _mul(tensors: List[Tensor], coeff: float) -> None:
    for t in tensors:
        t.mul_(coeff)

class LoRAOptimizer(torch.optim.Optimizer):
    """Base class: LoRA layers of ``model`` updated by the subclass, the rest by ``other``.

    Args:
        model: the model whose LoRA layers to train (``oplora.LoRALinear``; PEFT LoRA on Linear layers
            over any base, quantized ones included, on Conv1d/2d/3d and on Embedding layers: the
            kinds of :mod:`oplora.capture`).
        defaults: the LoRA group's hyper-parameters (``lr`` included), already validated.
        other: optimizer for every other trainable parameter: ``"adamw"`` (default), ``"adam"``,
            ``"sgd"``, or a ``torch.optim.Optimizer`` subclass.
        other_kwargs: its keyword arguments; ``lr`` defaults to the LoRA learning rate.
        strict: raise instead of warning when the model has LoRA factors on a layer type that
            cannot be captured (DoRA and other variants, grouped convolutions, ...); without it they
            go to ``other``.
        max_grad_norm: clip the total gradient norm to it, as ``torch.nn.utils.clip_grad_norm_``
            would (None, the default: no clipping; ``math.inf``: measure only). Stored in the LoRA
            group (``param_groups[0]["max_grad_norm"]``), so it can be changed between steps.
        skip_nonfinite: when a captured X or sD, or a gradient, holds NaN/Inf, skip the step
            (nothing moves) and count it in ``skipped_steps`` instead of raising.
        process_group: the ``torch.distributed`` group to reduce over (default: the default group
            when torch.distributed is initialized).
        capture: what is held between backward and step (``oplora.capture.Capture``): ``"auto"``
            (default) the captured rows until they would cost more than the layer's dense m x n
            float32 gradient, then that gradient (rows folded in by one GEMM as they arrive), so
            that a layer holds at most ``min(T (m + n), m n)`` numbers however many micro-batches
            accumulate; ``"rows"`` always the rows; ``"dense"`` always the dense gradient. The steps
            are the same, to float32 rounding. ``capture_bytes()`` reports what is held.

    Clipping (``max_grad_norm``): the total norm over every LoRA layer's implicit gradient and
    every other ``.grad``, after GradScaler unscaling (:mod:`oplora.optim.clipping`); the
    coefficient scales the LoRA gradient term through the step context (X and sD are never
    copied) and the other ``.grad`` in place. Data parallel: each rank captures its own rows and
    only r-sized products cross the network; a step equals one process on the concatenated batch
    (:mod:`oplora.optim._distributed`). Not supported with ``world > 1`` (``NotImplementedError``
    at construction): clipping of the captured optimizers, SVDLoRA, Shampoo statistics. FSDP
    modules and DTensor parameters are refused with the plan (``NotImplementedError``).

    Raises ``TypeError`` for a non-module model and ``ValueError`` when the model has no
    trainable LoRA layer or for a bad ``max_grad_norm``, ``skip_nonfinite`` or ``process_group``.
    """

    #: whether the subclass needs X and sD (False: it works from autograd's factor gradients).
    uses_capture = True

    def __init__(self, model: nn.Module, defaults: dict, *, other: OtherSpec = "adamw",
                 other_kwargs: Optional[dict] = None, strict: bool = False,
                 max_grad_norm: Optional[float] = None, skip_nonfinite: bool = False, process_group=None,
                 capture: str = "auto"):
        name = type(self).__name__
        if not isinstance(model, nn.Module):
            raise TypeError(f"{name} is built from the model (an nn.Module), got {type(model).__name__}; "
                            "it finds the LoRA layers itself")
        defaults = dict(defaults, max_grad_norm=_guards.check_max_norm(max_grad_norm))
        if not isinstance(skip_nonfinite, bool):
            raise ValueError(f"skip_nonfinite must be a bool, got {skip_nonfinite!r}")
        check_choice(capture, "capture", CAPTURE_MODES)
        group = _distributed.resolve_group(process_group)
        _guards.refuse_sharded(name, model)
        sites = _guards.lora_sites(name, model, strict=strict, other_name=_inner.resolve(other, "other").__name__)
        if group is not None:
            reason = self._distributed_unsupported(defaults)
            if reason is not None:
                raise NotImplementedError(f"{name} with {torch.distributed.get_world_size(group)} "
                                          f"data-parallel ranks: {reason}")
        lora_params = [p for site in sites for p in (site.A, site.B)]
        super().__init__([{"params": lora_params, "kind": "lora"}], defaults)
        self._group_arg, self._group = process_group, group
        self._grad_norm: Optional[float] = None
        self.skip_nonfinite = skip_nonfinite
        #: steps skipped because of NaN/Inf with ``skip_nonfinite=True`` (GradScaler skips not counted).
        self.skipped_steps = 0
        self._sites: List[LoRASite] = sites
        self._inner: Dict[str, torch.optim.Optimizer] = {}
        self._model = weakref.ref(model)
        self._names = {id(p): n for n, p in model.named_parameters()}
        lora_ids = {id(p) for p in lora_params}
        other_params = list({id(p): p for p in model.parameters() if p.requires_grad and id(p) not in lora_ids}.values())
        if other_params:
            inner = _inner.build(other, other_params, defaults["lr"], other_kwargs, "other")
            group_dict = {"params": other_params, "kind": "other"}
            self.param_groups.append(group_dict)
            self._inner["other"] = _inner.share(inner, group_dict, self.state)
        if group is not None and "seed" in defaults:
            self.defaults["seed"] = self.lora_group["seed"] = _distributed.broadcast_seed(
                defaults["seed"], group, lora_params[0].device)
        self._capture = (Capture(sites, owner=self, mode=capture, stats=self._fold_stats(defaults))
                         if self.uses_capture else None)
        self._built = True

    def _distributed_unsupported(self, defaults: dict) -> Optional[str]:
        """Why this optimizer cannot run with these hyper-parameters on several ranks, or None."""
        if self.uses_capture and defaults.get("max_grad_norm") is not None:
            return ("max_grad_norm: the norm of the averaged implicit gradient (1/world) sum_k G_k needs "
                    "every rank's m x n gradient or rows, which never cross the network; clip without "
                    "data parallelism, or leave max_grad_norm=None")
        return None

    def _fold_stats(self, defaults: dict) -> Optional[str]:
        """The statistics rows folded into the dense gradient must keep (``oplora.capture.Folded``)."""
        return None

    def add_param_group(self, param_group: dict) -> None:
        """Groups are built from the model; adding one afterwards is refused with the reason."""
        if getattr(self, "_built", False):
            raise RuntimeError(f"{type(self).__name__} builds its param groups from the model (LoRA factors, "
                               "then every other trainable parameter); build a new optimizer instead of "
                               "adding a group")
        super().add_param_group(param_group)

    # -- public surface ---------------------------------------------------------------------
    @property
    def lora_group(self) -> dict:
        """The param group of the LoRA factors (group 0)."""
        return self.param_groups[0]

    @property
    def lora_layers(self) -> List[str]:
        """Names of the LoRA layers this optimizer updates (``module.path[adapter]`` for PEFT)."""
        return [site.name for site in self._sites]

    def grad_norm(self) -> Optional[float]:
        """The total gradient norm the last ``step()`` measured for clipping: over every LoRA
        layer's implicit ``G`` and every other parameter's ``.grad``, after GradScaler unscaling
        and before clipping. None when clipping is off (``max_grad_norm=None``: the norm costs
        ``min(T^2 (m + n) / 2, T m n)`` per layer and is not measured), before the first step, and
        after a skipped step."""
        return self._grad_norm

    def capture_bytes(self) -> int:
        """Bytes the capture holds now for the next step: captured X (each once, however many
        layers share it) and sD, and the rows folded into dense gradients (``capture=``). At most
        ``sum over layers of min(T (m + n), m n) x 4`` bytes with ``capture="auto"`` (float32)."""
        return 0 if self._capture is None else self._capture.held_bytes()

    def close(self) -> None:
        """Remove the capture hooks and release captured tensors (also done at garbage collection)."""
        if self._capture is not None:
            self._capture.close()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients of every parameter and release the captured X and sD."""
        super().zero_grad(set_to_none=set_to_none)
        if self._capture is not None:
            self._capture.clear()

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a ``state_dict()`` of the same optimizer on the same model; resumes bit-exactly.

        Unlike the base class, the LoRA layers' state keeps the dtype it was saved with (the
        K-FAC statistics stay float32 for bf16 factors); tensors move to the factor's device.
        """
        super().load_state_dict(state_dict)
        for kind, inner in self._inner.items():
            inner.param_groups = [g for g in self.param_groups if g["kind"] == kind]
            inner.state = self.state
        saved = state_dict["state"]
        for index, site in enumerate(self._sites):
            entry = saved.get(2 * index + 1)
            if not entry:
                continue
            own = self.state[site.B]
            for key, value in entry.items():
                if isinstance(value, Tensor) and isinstance(own.get(key), Tensor) and own[key].dtype != value.dtype:
                    own[key] = value.to(device=site.B.device, copy=True)

    #: ``torch.amp.GradScaler.step(opt)`` hands this optimizer the loss scale (``grad_scale``) and
    #: ``found_inf`` instead of unscaling ``.grad`` itself: the captured sD is scaled too, and only
    #: the optimizer can unscale it.
    _step_supports_amp_scaling = True

    # -- the step -----------------------------------------------------------------------------
    def step(self, closure=None):
        """Update every LoRA layer reached since the last step, then the other parameters.

        ``closure`` (optional) re-evaluates the model and returns the loss; it runs with grad
        enabled before the update. Captured tensors are released afterwards, whatever happens.

        In order: the model is checked against the one the optimizer was built from; GradScaler's
        verdict is read; the captured X and sD (RiemannianLoRA: the factor gradients) and every
        other ``.grad`` are checked for NaN/Inf (all ranks agree on the verdict); gradients are
        unscaled, measured and clipped (``max_grad_norm``); every reached layer is solved
        (reduced over the ranks) and committed, all layers or none; the other optimizer steps.

        Under ``torch.amp.GradScaler`` (``scaler.step(opt)``): a step whose gradients hold inf/NaN
        is skipped whole (factors, momentum, statistics, other parameters); otherwise the captured
        sD and every ``.grad`` are unscaled before the update. ``scaler.unscale_(opt)`` before
        ``scaler.step(opt)`` is refused (it unscales ``.grad`` only, not the captured sD).

        Raises, before anything moves (so nothing is lost):

        * ``FloatingPointError`` naming the layer (or parameter) when a captured X or sD or a
          gradient holds NaN/Inf outside AMP, unless ``skip_nonfinite=True`` (then the step is
          skipped and counted in ``skipped_steps``);
        * ``RuntimeError`` naming the layer when its factors received gradients since the last
          step while nothing was captured for it (its forward bypassed the capture hooks: code
          compiled by torch.compile before the optimizer was built, a fused LoRA kernel), when a
          captured X was modified in place after its backward pass, when a layer's factors, captured tensors or state are on different
          devices, or when the model changed after the optimizer was built (a LoRA layer added or
          removed, a factor replaced or its ``requires_grad`` turned off, a new trainable
          parameter), and when another rank refused the step;
        * ``NotImplementedError`` for clipping a captured optimizer on several ranks.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        try:
            with torch.no_grad():
                ctx = self._context()
                if ctx is not None and self._step_lora(ctx) and "other" in self._inner:
                    self._inner["other"].step()
        finally:
            if self._capture is not None:
                self._capture.clear()
        return loss

    def _context(self) -> Optional[F.StepContext]:
        """Guards, unscaling and clipping: the context of this step, or None when it is skipped."""
        name = type(self).__name__
        _guards.check_model(name, self._model(), self._sites, self.lora_group["params"],
                            [p for g in self.param_groups for p in g["params"]])
        inv_scale = self._amp_inverse_scale()
        self._grad_norm = None
        if inv_scale is None:  # GradScaler found inf/NaN: skip the step, as torch optimizers do
            return None
        group = _distributed.resolve_group(self._group_arg)
        if group is not self._group:
            raise RuntimeError(f"{name} was built before torch.distributed was initialized (or the process "
                               "group changed since): build the optimizer after init_process_group, so that "
                               "every rank starts from the same state")
        rows = [site.rows for site in self._sites]
        error, bad, world = None, None, 1
        try:
            if self.uses_capture:
                _guards.check_captured(name, self._sites)
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
        # The .grad the step reads: the other group's (captured optimizers), or every group's.
        stepped = [p.grad for g in self.param_groups[1 if self.uses_capture else 0:] for p in g["params"]
                   if p.grad is not None]
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

    def _amp_inverse_scale(self) -> Optional[float]:
        """1 / loss scale set by GradScaler.step (1.0 without one); None when it found inf/NaN."""
        found_inf = getattr(self, "found_inf", None)
        if found_inf is None:
            return 1.0
        if float(found_inf) > 0:
            return None
        scale = getattr(self, "grad_scale", None)
        if scale is None:
            raise RuntimeError(f"{type(self).__name__}: GradScaler.unscale_() was called before "
                               "GradScaler.step(): it unscales .grad only, while this optimizer steps "
                               "from the captured activations' gradients; call scaler.step(opt) "
                               "without unscale_ (nothing was updated)")
        return 1.0 / float(scale)

    def _step_lora(self, ctx: F.StepContext) -> bool:
        """Plan every reached layer's update (``self._plan``), solve them together, then write them
        all: a step that fails in any layer's solve leaves every factor and every state untouched.
        Returns False when the step is skipped (NaN/Inf with ``skip_nonfinite``): nothing moves.

        On several ranks a layer reached on any rank is stepped on all (with no rows of its own
        where it was not reached), so that every rank takes part in the same reductions."""
        group, pending = self.lora_group, []
        try:
            for index, site in enumerate(self._sites):
                chunks = [(x, g) for x, g, _ in site.chunks]
                if not chunks and site.folded is None and ctx.rows.get(index, 0) > 0:
                    m, n = site.shape
                    chunks = [(site.A.new_zeros(0, n), site.B.new_zeros(0, m))]
                if chunks or site.folded is not None:
                    state = self.state.get(site.B, {})
                    pending.append((site, self._plan(index, site, chunks, site.folded, state, group, ctx)))
            updates = F.run_plans([plan for _, plan in pending], ctx.reduce)
        except (FloatingPointError, torch.linalg.LinAlgError) as err:
            # A NaN or Inf in the rows showed in a layer's products (or broke a solve): name it.
            bad = self._find_nonfinite(rows=True)
            if bad is None and isinstance(err, engine.NonFiniteProducts):
                bad = f"the gradient products of LoRA layer {pending[err.index][0].name!r} (another rank's rows?)"
            if bad is None:
                raise
            return self._nonfinite(f"{bad} holds NaN or Inf")
        F.commit([(update, site.b, site.a, self.state[site.B]) for (site, _), update in zip(pending, updates)])
        return True

    def _fold_all(self, site: LoRASite) -> Folded:
        """Every row of ``site`` folded into its dense gradient, for the updates that need G itself
        (an empty one for a layer without rows on this rank)."""
        site.fold(self._capture.stats)
        if site.folded is None:
            site.folded = Folded.empty(*site.shape, compute_dtype(site.B), site.B.device, self._capture.stats)
        return site.folded

    @staticmethod
    def _site_seed(group: dict, index: int) -> int:
        return (int(group["seed"]) * 1_000_003 + index) % (2**63 - 1)
