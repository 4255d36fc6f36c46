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

A step, in order (:meth:`step`): the guards (``_guards``, gathered in ``_context``: model structure unchanged, devices,
NaN/Inf; every rank agreeing under data parallelism, ``_distributed``), what is captured brought
in line with the factors' ``.grad`` (``oplora.capture.lifetime``: discarded, rescaled; frozen adapters
dropped), GradScaler unscaling and clipping (``clipping``) -- which give the step's
:class:`~oplora.optim.functional.StepContext`, passed down as an argument -- then the LoRA
layers (``_step_lora``, in ``_stepping``), then the other parameters. ``load_state_dict`` validates what it
loads (``_checkpoint``); ``master_factors`` keeps float32 factors in the state (``_masters``);
``copy.deepcopy`` and ``pickle`` rebuild the optimizer on the copied model (``_copies``).

Subclasses set their hyper-parameters (validated) in ``defaults`` and either implement
``_plan(index, site, factors, chunks, folded, state, group, ctx) -> Plan`` (a layer's update of
``factors`` -- ``(B, A)`` as matrices, or their float32 masters -- from its captured rows and the
rows folded into its dense gradient; the default :meth:`_step_lora` solves every reached
layer's plan together in the step engine and commits all or none) or override
:meth:`_step_lora` (RiemannianLoRA, which steps from autograd's factor gradients and sets
``uses_capture = False``); ``_state_spec`` says what a layer's state holds (for
``load_state_dict``), ``_other_shares_lr`` whether the other optimizer's lr defaults to ``lr``.
"""

from __future__ import annotations

import gc
import weakref
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from .._checks import check_bool, check_choice
from ..capture import CAPTURE_MODES, Capture, check_budget
from ..capture.sites import LoRASite
from . import _checkpoint, _distributed, _fsdp, _guards, _inner, _masters, _summary
from ._context import ContextMixin
from ._copies import CopyMixin
from ._stepping import StepMixin
from ._inner import OtherSpec

__all__ = ["LoRAOptimizer"]


class LoRAOptimizer(CopyMixin, ContextMixin, StepMixin, torch.optim.Optimizer):
    """Base class: LoRA layers of ``model`` updated by the subclass, the rest by ``other``.

    Args:
        model: the model whose LoRA layers to train (``oplora.LoRALinear``; PEFT LoRA on Linear layers
            over any base, quantized ones included, on Conv1d/2d/3d and on Embedding layers: the
            kinds of :mod:`oplora.capture`).
        defaults: the LoRA group's hyper-parameters (``lr`` included), already validated.
        other: optimizer for every other trainable parameter: ``"adamw"`` (default), ``"adam"``,
            ``"sgd"``, or a ``torch.optim.Optimizer`` subclass.
        other_kwargs: its keyword arguments. Its ``lr`` defaults to its own default (AdamW's
            1e-3) where this optimizer's lr is on SGD's scale (OPLoRA, SVDLoRA, RiemannianLoRA
            with base SGD), and to ``lr`` where it is on Adam's (ScaledOPLoRA, RiemannianLoRA
            with base AdamW).
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
        capture_budget: bytes (int) or a fraction of the device's free memory (float in (0, 1],
            read at each backward pass) that what is held between backward and step may use, with
            ``capture="auto"``: the rows are held (never folded: the fold's GEMM stays off the
            backward pass) while everything fits; a layer whose rows would cross it folds into its
            dense gradient while that fits, else into a sketch of its gradient that does not grow
            with tokens (``oplora.capture.sketch``: its step is approximate, exact on the layer's own
            factors). None (default): no budget. Not with data parallelism yet.
        sketch_rank: the Gaussian directions of a sketch beside the layer's r own (range
            ``r + sketch_rank``, co-range ``r + 2 sketch_rank + 1``; default 64: in the LM study the
            sketched run ends within 0.05 perplexity of the exact one, 0.6 at 32). None: never
            sketch -- a layer past the budget folds into its dense gradient, so the step stays
            exact: ``capture_budget=<bytes>, sketch_rank=None`` holds the rows (no fold GEMM in
            backward, the whole step as fast as ``capture="rows"``) while they fit, and what is
            held stays near ``max(budget, the dense gradients)``.
        master_factors: for bfloat16/float16 LoRA factors, keep float32 copies of them in the state
            (``master_B``, ``master_A``) and step those, writing their rounding into the factors, so
            that updates smaller than the factors' precision accumulate instead of being lost
            (``oplora.optim._masters``). Memory: 4 bytes per LoRA parameter for the masters, and
            the momentum (kept in the dtype of what is stepped) in float32 too: 8 bytes of state
            per parameter instead of 2 (OPLoRA; AdamW on bf16 factors keeps 4). No effect for
            float32/float64 factors.

    Clipping (``max_grad_norm``): the total norm over every LoRA layer's implicit gradient and
    every other ``.grad``, after GradScaler unscaling (:mod:`oplora.optim.clipping`); the
    coefficient scales the LoRA gradient term through the step context (X and sD are never
    copied) and the other ``.grad`` in place. Data parallel: each rank captures its own rows and
    only r-sized products cross the network; a step equals one process on the concatenated batch
    (:mod:`oplora.optim._distributed`). Not supported with ``world > 1`` (``NotImplementedError``
    at construction): clipping of the captured optimizers, SVDLoRA, Shampoo statistics. FSDP2
    (``fully_shard``): LoRA factors that are sharded DTensors are gathered at the step and each
    rank writes its rows of the update and of the (sharded) state (:mod:`oplora.optim._fsdp`);
    build the optimizer after ``fully_shard``. FSDP1 modules are refused (``NotImplementedError``
    naming ``fully_shard``).

    The optimizer covers every LoRA adapter of the model, frozen or not: an adapter is trained
    at the steps its factors require grad and received gradients at (PEFT's ``set_adapter``
    between steps simply switches which adapter trains); the others keep their factors and state.

    Raises ``TypeError`` for a non-module model and ``ValueError`` when the model has no LoRA
    layer or only unsupported ones, or for a bad ``max_grad_norm``, ``skip_nonfinite``,
    ``master_factors`` or ``process_group``.
    """

    #: whether the subclass needs X and sD (False: it works from autograd's factor gradients).
    uses_capture = True
    #: Each hyper-parameter of the LoRA group and its check (raises a ValueError naming it, returns
    #: the value to store); a subclass extends it. Used at construction and at every step, since
    #: sweep and config tools write hyper-parameters into ``param_groups`` directly.
    HYPER_CHECKS: Dict[str, Callable] = {
        "max_grad_norm": _guards.check_max_norm,
        "master_factors": lambda v: check_bool(v, "master_factors"),
    }

    def __init__(self, model: nn.Module, defaults: dict, *, other: OtherSpec = "adamw",
                 other_kwargs: Optional[dict] = None, strict: bool = False,
                 max_grad_norm: Optional[float] = None, skip_nonfinite: bool = False, process_group=None,
                 capture: str = "auto", master_factors: bool = False,
                 capture_budget: Union[None, int, float] = None, sketch_rank: Optional[int] = 64):
        name = type(self).__name__
        if not isinstance(model, nn.Module):
            raise TypeError(f"{name} is built from the model (an nn.Module), got {type(model).__name__}; it finds "
                            "the LoRA layers itself. With the Hugging Face Trainer, pass "
                            f"optimizer_cls_and_kwargs=(oplora.{name}, {{'model': model, 'lr': ...}}) (the Trainer "
                            f"then hands it the model instead of parameter groups) or optimizers=(oplora.{name}(model, "
                            "...), scheduler)")
        defaults = dict(defaults, max_grad_norm=_guards.check_max_norm(max_grad_norm))
        for flag, value in (("skip_nonfinite", skip_nonfinite), ("master_factors", master_factors)):
            if not isinstance(value, bool):
                raise ValueError(f"{flag} must be a bool, got {value!r}")
        if self.uses_capture:
            defaults["master_factors"] = master_factors
        check_choice(capture, "capture", CAPTURE_MODES)
        capture_budget = check_budget(capture_budget, capture)
        if sketch_rank is not None and (isinstance(sketch_rank, bool) or not isinstance(sketch_rank, int)
                                        or sketch_rank < 1):
            raise ValueError(f"sketch_rank must be an int >= 1 or None (never sketch), got {sketch_rank!r}")
        if capture_budget is not None:
            why = self._budget_unsupported(defaults)
            if why is not None:
                raise ValueError(f"{name}: capture_budget is not supported with {why}")
        group = _distributed.resolve_group(process_group)
        _guards.refuse_fsdp1(name, model)
        sites, unsupported = _guards.lora_sites(name, model, strict=strict,
                                                other_name=_inner.resolve(other, "other").__name__)
        #: per site, the layout of its FSDP2-sharded factors (None: whole tensors on every rank).
        self._layouts: List[Optional[_fsdp.Layout]] = [_fsdp.site_layout(name, site) for site in sites]
        for site, lay in zip(sites, self._layouts):
            if lay is not None:
                site.pinned = (site.A, site.B)
        if capture_budget is not None and (group is not None or any(lay is not None for lay in self._layouts)):
            raise NotImplementedError(f"{name}: capture_budget with data parallelism (DDP, FSDP2) is not supported "
                                      "yet: each rank's sketch would need the same random directions and a "
                                      "reduction; leave capture_budget=None there")
        if group is not None:
            reason = self._distributed_unsupported(defaults)
            if reason is not None:
                raise NotImplementedError(f"{name} with {torch.distributed.get_world_size(group)} "
                                          f"data-parallel ranks: {reason}")
        #: the LoRA layers left to the other optimizer: (name, why).
        self._unsupported = [(u.name, u.reason) for u in unsupported]
        unsupported = [p for u in unsupported for p in u.params]
        lora_params = [p for site in sites for p in (site.A, site.B)]
        super().__init__([{"params": lora_params, "kind": "lora"}], defaults)
        self._hyper = tuple(defaults)  # this optimizer's hyper-parameters (a checkpoint must hold them)
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
        trainable = [p for p in model.parameters() if p.requires_grad and id(p) not in lora_ids]
        other_params = list({id(p): p for p in trainable + unsupported}.values())
        if other_params:
            lr = defaults["lr"] if self._other_shares_lr(defaults) else None
            inner = _inner.build(other, other_params, lr, other_kwargs, "other")
            group_dict = {"params": other_params, "kind": "other"}
            self.param_groups.append(group_dict)
            self._inner["other"] = _inner.share(inner, group_dict, self.state)
        if group is not None and "seed" in defaults:
            self.defaults["seed"] = self.lora_group["seed"] = _distributed.broadcast_seed(
                defaults["seed"], group, lora_params[0].device)
        self._capture = (Capture(sites, owner=self, mode=capture, stats=self._fold_stats(defaults),
                                 budget=capture_budget, sketch_rank=sketch_rank)
                         if self.uses_capture else None)
        self._built = True

    def __repr__(self) -> str:
        """A summary for a user debugging a run (``print(opt)``): hyper-parameters, the LoRA layers
        trained and those left to the other optimizer (and why), the other parameters, what the
        capture holds now, the backend per device (:func:`oplora.optim._summary.summary`)."""
        return _summary.summary(self)

    @property
    def _sharded(self) -> bool:
        """Whether any LoRA layer's factors are FSDP2-sharded DTensors (``oplora.optim._fsdp``)."""
        return any(lay is not None for lay in self._layouts)

    def _distributed_unsupported(self, defaults: dict) -> Optional[str]:
        """Why this optimizer cannot run with these hyper-parameters on several ranks, or None."""
        if self.uses_capture and defaults.get("max_grad_norm") is not None:
            return ("max_grad_norm: the norm of the averaged implicit gradient (1/world) sum_k G_k needs "
                    "every rank's m x n gradient or rows, which never cross the network; clip without "
                    "data parallelism, or leave max_grad_norm=None")
        return None

    def _budget_unsupported(self, defaults: dict) -> Optional[str]:
        """Why this optimizer cannot step from a sketched gradient (``capture_budget``), or None."""
        return None

    def _other_shares_lr(self, defaults: dict) -> bool:
        """Whether the other optimizer's lr defaults to this optimizer's ``lr`` (on Adam's scale)
        rather than to its own default (this lr on SGD's scale)."""
        return False

    def _state_spec(self, site: LoRASite, group: dict) -> Dict[str, Optional[Tuple[int, ...]]]:
        """The entries a stepped layer's state must hold (``load_state_dict`` checks them): name ->
        shape of the tensor (None: the integer ``step``)."""
        spec: Dict[str, Optional[Tuple[int, ...]]] = {"step": None}
        if group.get("master_factors") and _masters.wanted(site):
            spec.update(master_B=tuple(site.b.shape), master_A=tuple(site.a.shape))
        return spec

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
        """Names of the LoRA adapters this optimizer covers (``module.path[adapter]`` for PEFT), frozen
        ones included: each is trained at the steps its factors require grad and were reached at."""
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
        ``sum over layers of min(T (m + n), m n) x 4`` bytes with ``capture="auto"`` (float32).
        Rows whose factor gradients were discarded since (``oplora.capture.lifetime``) are released first."""
        if self._capture is None:
            return 0
        self._capture.sync()
        return self._capture.held_bytes()

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

        What is loaded is validated first (``oplora.optim._checkpoint``): the LoRA group's
        hyper-parameters, and per LoRA layer every state entry its settings need, with the
        layer's shapes, finite values, non-negative K-FAC statistics; per other parameter the
        torch optimizer's moment buffers' shapes. Anything wrong raises ``ValueError`` naming the
        layer (or parameter) and the key, and the optimizer stays as it was.

        Unlike the base class, the LoRA layers' state keeps the dtype it was saved with (the
        K-FAC statistics stay float32 for bf16 factors); tensors move to the factor's device.
        FSDP2: the state of a sharded layer may be its shards (DTensors, any layout) or whole
        tensors (a full state dict); each rank keeps its rows (``oplora.optim._fsdp``).
        """
        _checkpoint.validate(self, state_dict)
        super().load_state_dict(state_dict)
        for key, value in _checkpoint.LEGACY.items():  # a checkpoint older than the hyper-parameter
            if key in self._hyper:
                self.lora_group.setdefault(key, value)
        for kind, inner in self._inner.items():
            inner.param_groups = [g for g in self.param_groups if g["kind"] == kind]
            inner.state = self.state
        _checkpoint.keep_dtypes(self, state_dict)
        for site, lay in zip(self._sites, self._layouts):
            if lay is not None and self.state.get(site.B):
                _fsdp.adopt(self.state[site.B], lay)

    #: ``torch.amp.GradScaler.step(opt)`` hands this optimizer the loss scale (``grad_scale``) and
    #: ``found_inf`` instead of unscaling ``.grad`` itself: the captured sD is scaled too, and only
    #: the optimizer can unscale it.
    _step_supports_amp_scaling = True

    # -- the step -----------------------------------------------------------------------------
    def step(self, closure=None):
        """Update every LoRA layer reached since the last step, then the other parameters.

        ``closure`` (optional) re-evaluates the model and returns the loss; it runs with grad
        enabled before the update. Captured tensors are released afterwards, whatever happens.
        Python's cyclic garbage collector is paused while the update runs and restored after
        (``gc.isenabled()`` is as before the call).

        In order: the model's structure is checked against the one the optimizer was built from;
        what is captured is brought in line with the factors' ``.grad`` (rows of discarded or
        zeroed gradients dropped, a uniform rescale such as ``clip_grad_norm_`` applied, frozen
        adapters dropped); GradScaler's verdict is read; the captured X and sD (RiemannianLoRA: the
        factor gradients) and every other ``.grad`` are checked for NaN/Inf (all ranks agree on the
        verdict); gradients are unscaled, measured and clipped (``max_grad_norm``); every reached
        layer is solved (reduced over the ranks) and committed, all layers or none; the other
        optimizer steps.

        Under ``torch.amp.GradScaler`` (``scaler.step(opt)``): a step whose gradients hold inf/NaN
        is skipped whole (factors, momentum, statistics, other parameters); otherwise the captured
        sD and every ``.grad`` are unscaled before the update. After ``scaler.unscale_(opt)`` (and
        a clipping of ``.grad``) the captured sD takes the factors' unscaling and rescale.

        Raises, before anything moves (so nothing is lost):

        * ``FloatingPointError`` naming the layer (or parameter) when a captured X or sD or a
          gradient holds NaN/Inf outside AMP, unless ``skip_nonfinite=True`` (then the step is
          skipped and counted in ``skipped_steps``);
        * ``RuntimeError`` naming the layer when its factors received gradients since the last
          step while nothing was captured for it (its forward bypassed the capture hooks: code
          compiled by torch.compile before the optimizer was built, a fused LoRA kernel), when
          its factor gradients carry second-order terms its rows do not (``create_graph=True``), when a
          captured X was modified in place after its backward pass, when a layer's factors,
          captured tensors or state are on different devices, or when the model's structure
          changed after the optimizer was built (a LoRA layer added or removed, a factor replaced,
          one factor of an adapter frozen without the other, a new trainable parameter), and when
          another rank refused the step;
        * ``NotImplementedError`` for clipping a captured optimizer on several ranks;
        * ``RuntimeError`` when the optimizer was closed (``close()``, or a newer optimizer built on
          the same LoRA layers took them over);
        * ``ValueError`` naming the entry when a hyper-parameter written into ``param_groups[0]``
          is out of its range (``iters=-1``, ``start="C"``, ``prox=-1``, ...).
        """
        self._check_hyper()
        if self._capture is not None and self._capture.closed_because is not None:
            raise RuntimeError(f"{type(self).__name__} is closed ({self._capture.closed_because}): its LoRA layers are "
                               "no longer captured. Build a new optimizer on the model (load_state_dict carries the "
                               "state over)")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Python's cyclic garbage collector is paused for the step: the step makes thousands of small
        # objects (a layer's plan, problems, runs), all freed by reference counting when it ends, and
        # a collection in the middle would move the live ones into the older generations, where they
        # add up to a full collection of the whole process's heap (~0.2 s with transformers loaded)
        # every dozen steps. Paused, they come and go without a collection; the collector resumes as
        # the step ends (as it was: a caller's gc.disable() is kept).
        collecting = gc.isenabled()
        gc.disable()
        try:
            with torch.no_grad():
                ctx = self._context()
                if ctx is not None and self._step_lora(ctx) and "other" in self._inner:
                    _inner.follow_momentum(self._inner["other"])
                    self._inner["other"].step()
        finally:
            if self._capture is not None:
                self._capture.clear()
                for site in self._sites:
                    site.second_order = False  # zero_grad() keeps it: a create_graph graph may outlive it
            if collecting:
                gc.enable()
        return loss

    def _check_hyper(self) -> None:
        """The LoRA group's hyper-parameters, as they are now (a scheduler, a sweep tool or a user
        may have written them), checked before anything moves: ``ValueError`` naming the entry."""
        group = self.lora_group
        for key, check in self.HYPER_CHECKS.items():
            if key in group:
                try:
                    check(group[key])
                except ValueError as err:
                    raise ValueError(f"{type(self).__name__}: param_groups[0][{key!r}] = {group[key]!r} is "
                                     f"refused: {err}; nothing was stepped") from None
