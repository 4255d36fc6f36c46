"""``LoRAOptimizer``: the base class every oplora optimizer is a short subclass of.

It owns what all of them share (SPEC section 3):

* the LoRA layers of the model (``oplora.capture.find_lora_sites``) and, for the optimizers that
  need X and sD, the capture hooks (``oplora.capture.Capture``);
* ``param_groups``: group 0 (``kind="lora"``) holds every LoRA factor, ``A`` then ``B`` per layer,
  with the optimizer's hyper-parameters; group 1 (``kind="other"``, present when the model has any)
  holds every other trainable parameter (biases, heads, norms, LoRA factors of unsupported
  layers), trained by a torch optimizer (AdamW by default) that shares this group dict and this
  ``state``. So LR schedulers, ``state_dict()`` and ``load_state_dict()`` cover everything;
* per-layer state keyed by the layer's ``B`` factor, tensors and plain values only;
* ``step(closure)``, ``zero_grad()`` (which also releases the captured tensors) and ``close()``;
* what makes a step training-grade: GradScaler loss scaling, gradient clipping of the implicit
  gradient (``max_grad_norm``, ``grad_norm()``), non-finite checks (``skip_nonfinite``,
  ``skipped_steps``), refusal of a model changed since the optimizer was built, and data-parallel
  reduction over a ``torch.distributed`` process group (see :class:`LoRAOptimizer`).

Subclasses implement ``_update_site`` (one layer's update from its captured chunks) and
validate their hyper-parameters with the ``_check_*`` helpers.
"""

from __future__ import annotations

import math
import numbers
import operator
import sys
import warnings
import weakref
from typing import Dict, List, Optional, Sequence, Tuple, Type, Union

import torch
from torch import Tensor, nn

from ..capture import Capture, LoRASite, find_lora_sites
from ..lorsum import first_nonfinite
from . import functional as F

__all__ = ["LoRAOptimizer"]

OtherSpec = Union[str, Type[torch.optim.Optimizer]]
_OTHER = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD, "adam": torch.optim.Adam}


def _check_real(value, name: str, *, low: float = -math.inf, high: float = math.inf,
                low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a float within the bounds, or a ValueError naming the hyper-parameter."""
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_complex():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    value = float(value)
    if value < low or value > high or (low_open and value == low) or (high_open and value == high):
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise ValueError(f"{name} must be in {lo}{low:g}, {high:g}{hi}, got {value!r}")
    return value


def _check_int(value, name: str, *, low: int = 0) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}") from None
    if value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def _check_choice(value, name: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")
    return value


def _check_max_norm(value) -> Optional[float]:
    """``max_grad_norm``: None (no clipping), a real > 0, or ``math.inf`` (measure, never clip)."""
    if value is None:
        return None
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and value == math.inf:
        return math.inf
    return _check_real(value, "max_grad_norm", low=0.0, low_open=True)


def _resolve_group(process_group):
    """The process group to reduce over: ``process_group``, else the default group when
    torch.distributed is initialized; None when that group has a single rank (nothing to reduce)."""
    dist = torch.distributed
    initialized = dist.is_available() and dist.is_initialized()
    if process_group is not None:
        if not initialized:
            raise ValueError("process_group was given but torch.distributed is not initialized")
        if not isinstance(process_group, dist.ProcessGroup):
            raise ValueError(f"process_group must be a torch.distributed.ProcessGroup or None, got "
                             f"{type(process_group).__name__}")
        group = process_group
    elif initialized:
        group = dist.group.WORLD
    else:
        return None
    return group if dist.get_world_size(group) > 1 else None


def _all_reduce_sum(tensors: List[Tensor], group) -> None:
    """Sum ``tensors`` over the ranks of ``group`` in place: one all-reduce of one flat buffer per
    (device, dtype) -- in practice one per call."""
    buckets: Dict[Tuple[torch.device, torch.dtype], List[Tensor]] = {}
    for t in tensors:
        buckets.setdefault((t.device, t.dtype), []).append(t)
    for ts in buckets.values():
        flat = torch.cat([t.reshape(-1) for t in ts])
        torch.distributed.all_reduce(flat, group=group)
        offset = 0
        for t in ts:
            t.copy_(flat[offset:offset + t.numel()].view(t.shape))
            offset += t.numel()


_SHARDED_PLAN = (
    "oplora optimizers need every rank to hold whole LoRA factors (B m x r, A r x n), as under "
    "DistributedDataParallel, which is supported (the thin products are reduced, never X, D or "
    "m x n). Planned for FSDP: keep the LoRA modules replicated (FSDP ignored_modules / not "
    "passed to fully_shard) and shard only the frozen base weights, with the thin products reduced "
    "as under DDP. Until then wrap the model with DistributedDataParallel")


def _sharded(model: nn.Module) -> Optional[str]:
    """The first FSDP-wrapped module or DTensor parameter of ``model`` (its description), or None.

    Only the types of modules already imported are looked up: a model cannot hold FSDP or DTensor
    objects unless their modules were imported, so nothing is imported here.
    """
    types = []
    fsdp = sys.modules.get("torch.distributed.fsdp")
    for name in ("FullyShardedDataParallel", "FSDPModule"):
        cls = getattr(fsdp, name, None) if fsdp is not None else None
        if isinstance(cls, type):
            types.append(cls)
    if types:
        for name, module in model.named_modules():
            if isinstance(module, tuple(types)):
                return f"module {name or '<the model>'!r} is {type(module).__name__} (FSDP)"
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    if isinstance(dtensor, type):
        for name, p in model.named_parameters():
            if isinstance(p, dtensor):
                return f"parameter {name!r} is a DTensor (FSDP2 fully_shard or tensor parallel)"
    return None


def _resolve(spec: OtherSpec, what: str) -> Type[torch.optim.Optimizer]:
    """The optimizer class ``spec`` names (a name in ``_OTHER`` or an Optimizer subclass)."""
    if isinstance(spec, str) and spec.lower() in _OTHER:
        return _OTHER[spec.lower()]
    if isinstance(spec, type) and issubclass(spec, torch.optim.Optimizer):
        return spec
    raise ValueError(f"{what} must be one of {', '.join(map(repr, _OTHER))} or a "
                     f"torch.optim.Optimizer subclass, got {spec!r}")


def _build_inner(spec: OtherSpec, params: List[nn.Parameter], lr: float, kwargs: Optional[dict],
                 what: str) -> torch.optim.Optimizer:
    """A torch optimizer over ``params`` (``spec`` a name in ``_OTHER`` or an Optimizer class)."""
    cls = _resolve(spec, what)
    if kwargs is not None and not isinstance(kwargs, dict):
        raise ValueError(f"{what}_kwargs must be a dict, got {type(kwargs).__name__}")
    kwargs = dict(kwargs or {})
    kwargs.setdefault("lr", lr)
    try:
        return cls(params, **kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what}={cls.__name__} rejected {what}_kwargs={kwargs!r}: {err}") from err


class LoRAOptimizer(torch.optim.Optimizer):
    """Base class: LoRA layers of ``model`` updated by ``_update_site``, the rest by ``other``.

    Args:
        model: the model whose LoRA layers (``oplora.LoRALinear``, PEFT ``lora.Linear``) to train.
        defaults: the LoRA group's hyper-parameters (``lr`` included), already validated.
        other: optimizer for every other trainable parameter: ``"adamw"`` (default), ``"adam"``,
            ``"sgd"``, or a ``torch.optim.Optimizer`` subclass.
        other_kwargs: its keyword arguments; ``lr`` defaults to the LoRA learning rate.
        strict: raise instead of warning when the model has LoRA factors on a layer type that
            cannot be captured (Conv, Embedding, DoRA); without it they go to ``other``.
        max_grad_norm: clip the total gradient norm to it, as ``torch.nn.utils.clip_grad_norm_``
            would (None, the default: no clipping; ``math.inf``: measure only). Stored in the LoRA
            group (``param_groups[0]["max_grad_norm"]``), so it can be changed between steps.
        skip_nonfinite: when a captured X or sD, or a gradient, holds NaN/Inf, skip the step
            (nothing moves) and count it in ``skipped_steps`` instead of raising.
        process_group: the ``torch.distributed`` group to reduce over (default: the default group
            when torch.distributed is initialized).

    Gradient clipping (SPEC section 3): the total norm is ``sqrt(sum_layers ||G||_F^2 +
    sum_other ||p.grad||^2)`` with each layer's implicit ``G = sD^T X`` (m x n) measured from the
    captured rows without forming it when that is cheaper
    (:func:`oplora.optim.functional.grad_sq_norm`), after GradScaler unscaling; the coefficient
    ``min(1, max_grad_norm / (total + 1e-6))`` multiplies the LoRA gradient term of the step, the
    momentum and the statistics (a coefficient: X and sD are never copied) and the other
    parameters' ``.grad`` (in place, as clip_grad_norm_ does). ``grad_norm()`` returns the total.
    (RiemannianLoRA works from the factor gradients: its norm is clip_grad_norm_'s over every
    ``.grad``.)

    Distributed data parallel (SPEC section 3): with ``world > 1`` ranks in the group, each rank
    captures its own rows. A step first all-reduces a small header (per-layer row counts, whether
    any rank found a bad value or refused the step, so every rank raises or skips together), then
    the step engine all-reduces, after each of its passes, the thin products (r-sized) and the
    K-FAC column sums in one flat buffer. The products are averaged (sum / world): under DDP each
    rank's sD is that of its local mean loss, and DDP's averaged gradient is
    ``G = (1/world) sum_k G_k`` -- the concatenated batch's when the ranks hold equal shares. The
    statistics treat ``sD_k / world`` as the rows of that gradient: ``d_in`` from the summed
    ``sum_t x_t^2`` over the global row count T, ``d_out`` from ``c * sum_k sum_t g_t^2 / world^2``
    with ``c`` = global T (mean loss), so that the per-example scale is the concatenated batch's.
    The momentum seed is broadcast from the group's rank 0 at construction (build the optimizer
    after ``init_process_group``). The other parameters get DDP's averaged ``.grad``. Not
    supported with ``world > 1`` (``NotImplementedError`` at construction): clipping of the
    captured optimizers (the norm of the averaged implicit gradient needs each rank's m x n
    gradient or rows), SVDLoRA (it forms m x n), Shampoo statistics (they need G). FSDP-wrapped
    modules and DTensor parameters are refused with the plan (``NotImplementedError``).

    Raises ``TypeError`` for a non-module model and ``ValueError`` when the model has no
    trainable LoRA layer or for a bad ``max_grad_norm``, ``skip_nonfinite`` or ``process_group``.
    """

    #: whether the subclass needs X and sD (False: it works from autograd's factor gradients).
    uses_capture = True

    def __init__(self, model: nn.Module, defaults: dict, *, other: OtherSpec = "adamw",
                 other_kwargs: Optional[dict] = None, strict: bool = False,
                 max_grad_norm: Optional[float] = None, skip_nonfinite: bool = False, process_group=None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"{type(self).__name__} is built from the model (an nn.Module), got "
                            f"{type(model).__name__}; it finds the LoRA layers itself")
        defaults = dict(defaults, max_grad_norm=_check_max_norm(max_grad_norm))
        if not isinstance(skip_nonfinite, bool):
            raise ValueError(f"skip_nonfinite must be a bool, got {skip_nonfinite!r}")
        group = _resolve_group(process_group)
        sharded = _sharded(model)
        if sharded is not None:
            raise NotImplementedError(f"{type(self).__name__}: {sharded}; {_SHARDED_PLAN}")
        other_cls = _resolve(other, "other")
        sites, unsupported = find_lora_sites(model)
        if unsupported:
            listing = "; ".join(f"{u.name}: {u.reason}" for u in unsupported)
            if strict:
                raise ValueError(f"{type(self).__name__}(strict=True): unsupported LoRA layers: {listing}")
            warnings.warn(f"{type(self).__name__}: these LoRA layers cannot be captured and are "
                          f"trained by the other-parameter optimizer ({other_cls.__name__}) instead: "
                          f"{listing}", stacklevel=3)
        if not sites:
            raise ValueError(f"{type(self).__name__}: the model has no trainable LoRA layer "
                             "(oplora.LoRALinear or PEFT lora.Linear with requires_grad factors); "
                             "add adapters with oplora.add_lora(...) or peft.get_peft_model(...)")
        if group is not None:
            reason = self._distributed_unsupported(defaults)
            if reason is not None:
                raise NotImplementedError(f"{type(self).__name__} with {torch.distributed.get_world_size(group)} "
                                          f"data-parallel ranks: {reason}")
        lora_params = [p for site in sites for p in (site.A, site.B)]
        super().__init__([{"params": lora_params, "kind": "lora"}], defaults)
        self._group_arg = process_group
        self._group = group
        self._grad_coeff = 1.0  # multiplier of the captured sD during a step (unscale, clip, 1/world)
        self._rows: Dict[int, int] = {}  # global row count per layer index during a distributed step
        self._reduce = None  # the all-reduce hook during a distributed step
        self._grad_norm: Optional[float] = None
        self.skip_nonfinite = skip_nonfinite
        #: steps skipped because of NaN/Inf with ``skip_nonfinite=True`` (GradScaler skips not counted).
        self.skipped_steps = 0
        self._sites: List[LoRASite] = sites
        self._inner: Dict[str, torch.optim.Optimizer] = {}
        self._model = weakref.ref(model)
        self._names = {id(p): name for name, p in model.named_parameters()}
        seen = {id(p) for p in lora_params}
        other_params = []
        for p in model.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                other_params.append(p)
        if other_params:
            inner = _build_inner(other, other_params, defaults["lr"], other_kwargs, "other")
            group_dict = {"params": other_params, "kind": "other"}
            self.param_groups.append(group_dict)
            self._share("other", inner, group_dict)
        if group is not None and "seed" in defaults:
            # Every rank must start the momentum from the same random Vm.
            seed = torch.tensor([int(defaults["seed"])], dtype=torch.int64, device=lora_params[0].device)
            torch.distributed.broadcast(seed, src=torch.distributed.get_global_rank(group, 0), group=group)
            self.defaults["seed"] = self.lora_group["seed"] = int(seed.item())
        self._capture = Capture(sites, owner=self) if self.uses_capture else None
        self._built = True

    def _distributed_unsupported(self, defaults: dict) -> Optional[str]:
        """Why this optimizer cannot run with these hyper-parameters on several ranks, or None."""
        if self.uses_capture and defaults.get("max_grad_norm") is not None:
            return ("max_grad_norm: the norm of the averaged implicit gradient (1/world) sum_k G_k needs "
                    "every rank's m x n gradient or rows, which never cross the network; clip without "
                    "data parallelism, or leave max_grad_norm=None")
        return None

    def add_param_group(self, param_group: dict) -> None:
        """Groups are built from the model; adding one afterwards is refused with the reason."""
        if getattr(self, "_built", False):
            raise RuntimeError(f"{type(self).__name__} builds its param groups from the model (LoRA factors, "
                               "then every other trainable parameter); build a new optimizer instead of "
                               "adding a group")
        super().add_param_group(param_group)

    # -- sharing groups and state with inner torch optimizers ------------------------------
    def _share(self, kind: str, inner: torch.optim.Optimizer, group: dict) -> None:
        """Make ``inner`` work on ``group`` (this optimizer's dict) and on ``self.state``."""
        (inner_group,) = inner.param_groups
        for key, value in inner_group.items():
            if key != "params":
                group.setdefault(key, value)
        inner.param_groups = [group]
        inner.state = self.state
        self._inner[kind] = inner

    def _relink(self) -> None:
        for kind, inner in self._inner.items():
            inner.param_groups = [g for g in self.param_groups if g["kind"] == kind]
            inner.state = self.state

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

    def close(self) -> None:
        """Remove the capture hooks and release captured tensors (also done at garbage collection)."""
        if self._capture is not None:
            self._capture.close()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients of every parameter and release the captured X and sD."""
        super().zero_grad(set_to_none=set_to_none)
        if self._capture is not None:
            self._capture.clear()

    #: ``torch.amp.GradScaler.step(opt)`` hands this optimizer the loss scale (``grad_scale``) and
    #: ``found_inf`` instead of unscaling ``.grad`` itself: the captured sD is scaled too, and only
    #: the optimizer can unscale it.
    _step_supports_amp_scaling = True

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
        * ``RuntimeError`` naming the layer when a captured X was modified in place after its
          backward pass, when a layer's factors, captured tensors or state are on different
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
                self._step()
        finally:
            self._grad_coeff = 1.0
            self._rows = {}
            self._reduce = None
            if self._capture is not None:
                self._capture.clear()
        return loss

    def _step(self) -> None:
        self._check_model()
        inv_scale = self._amp_inverse_scale()
        self._grad_norm = None
        if inv_scale is None:  # GradScaler found inf/NaN: skip the step, as torch optimizers do
            return
        group = self._current_group()
        error: Optional[RuntimeError] = None
        bad: Optional[str] = None
        try:
            bad = self._find_nonfinite()
        except RuntimeError as err:
            if group is None:
                raise
            error = err  # raised once every rank knows, so that none is left waiting in a collective
        rows = [sum(x.shape[0] for x, _, _ in site.chunks) for site in self._sites]
        world = 1
        if group is not None:
            world = torch.distributed.get_world_size(group)
            header = torch.tensor([error is not None, bad is not None, *rows], dtype=torch.float64,
                                  device=self._sites[0].B.device)
            torch.distributed.all_reduce(header, group=group)
            n_error, n_bad, *rows = (int(v) for v in header.tolist())
            if error is not None:
                raise error
            if n_error:
                raise RuntimeError(f"{type(self).__name__}: another rank of the process group refused this "
                                   "step (its error says why); nothing was updated on any rank")
            if n_bad and bad is None:
                bad = "a captured tensor or gradient on another rank"
        if bad is not None:
            self._nonfinite(f"{bad} holds NaN or Inf")
            return
        if inv_scale != 1.0:
            self._unscale_grads(inv_scale)
        coeff = inv_scale
        max_norm = self.lora_group["max_grad_norm"]
        if max_norm is not None:
            if group is not None:
                reason = self._distributed_unsupported(self.lora_group)
                if reason is not None:
                    raise NotImplementedError(f"{type(self).__name__} with {world} data-parallel ranks: {reason}")
            total = self._total_norm(inv_scale)
            if not math.isfinite(total):
                self._nonfinite(f"the total gradient norm overflowed ({total})")
                return
            self._grad_norm = total
            clip = min(1.0, float(max_norm) / (total + 1e-6))
            if clip < 1.0:
                self._scale_grads(clip)
                coeff *= clip
        self._grad_coeff = coeff / world
        if group is not None:
            self._rows = dict(enumerate(rows))
            self._reduce = lambda tensors: _all_reduce_sum(tensors, group)
        self._step_lora(self.lora_group)
        if "other" in self._inner:
            self._inner["other"].step()

    def _nonfinite(self, what: str) -> None:
        """Skip the step (``skip_nonfinite``) or raise FloatingPointError saying ``what``."""
        if self.skip_nonfinite:
            self.skipped_steps += 1
            return
        raise FloatingPointError(f"{type(self).__name__}: {what}; nothing was updated "
                                 "(skip_nonfinite=True skips such steps instead)")

    def _current_group(self):
        """The process group of this step (None: one process), as at construction."""
        group = _resolve_group(self._group_arg)
        if group is not self._group:
            raise RuntimeError(f"{type(self).__name__} was built before torch.distributed was initialized "
                               "(or the process group changed since): build the optimizer after "
                               "init_process_group, so that every rank starts from the same state")
        return group

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

    def _unscale_grads(self, inv_scale: float) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.mul_(inv_scale)

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a ``state_dict()`` of the same optimizer on the same model; resumes bit-exactly.

        Unlike the base class, the LoRA layers' state keeps the dtype it was saved with (the
        K-FAC statistics stay float32 for bf16 factors); tensors move to the factor's device.
        """
        super().load_state_dict(state_dict)
        self._relink()
        saved = state_dict["state"]
        for index, site in enumerate(self._sites):
            entry = saved.get(2 * index + 1)
            if not entry:
                continue
            own = self.state[site.B]
            for key, value in entry.items():
                if isinstance(value, Tensor) and isinstance(own.get(key), Tensor) and own[key].dtype != value.dtype:
                    own[key] = value.to(device=site.B.device, copy=True)

    # -- the update ---------------------------------------------------------------------------
    def _check_model(self) -> None:
        """Refuse (RuntimeError naming them) changes of the model since the optimizer was built
        that would silently lose or skip training: LoRA layers added or removed, factors replaced
        by new tensors or with ``requires_grad`` off, trainable parameters the optimizer does not
        know. (An other parameter with ``requires_grad`` turned off simply gets no gradient and
        is skipped by its optimizer, as with any torch optimizer.)"""
        model = self._model()
        lora = self.lora_group["params"]
        params = [] if model is None else list(model.parameters())
        present = None if model is None else {id(p) for p in params}
        problems = []
        for index, site in enumerate(self._sites):
            a, b = lora[2 * index], lora[2 * index + 1]
            if site.A is not a or site.B is not b:
                problems.append(f"LoRA layer {site.name!r}: a factor was replaced by a new tensor")
            elif present is not None and (id(a) not in present or id(b) not in present):
                problems.append(f"LoRA layer {site.name!r} was removed from the model")
            elif not (a.requires_grad and b.requires_grad):
                problems.append(f"LoRA layer {site.name!r}: requires_grad was turned off on its factors "
                                "(it would silently stop training)")
        if model is not None:
            known = {id(p) for g in self.param_groups for p in g["params"]}
            unknown = {id(p) for p in params if p.requires_grad and id(p) not in known}
            if unknown:
                added = []
                for site in find_lora_sites(model)[0]:
                    if id(site.A) in unknown or id(site.B) in unknown:
                        added.append(f"LoRA layer {site.name!r}")
                        unknown -= {id(site.A), id(site.B)}
                names = [name for name, p in model.named_parameters() if id(p) in unknown]
                listing = ", ".join(added + [f"parameter {n!r}" for n in names])
                problems.append(f"trainable but unknown to the optimizer (added, or requires_grad turned on, "
                                f"after it was built; they would not be trained): {listing}")
        if problems:
            raise RuntimeError(f"{type(self).__name__}: the model changed after the optimizer was built: "
                               f"{'; '.join(problems)}. Build a new optimizer for the changed model "
                               "(state_dict() keeps the state of the layers that remain). Nothing was updated")

    def _check_devices(self, site: LoRASite) -> None:
        device = site.B.device
        found = {f"A on {site.A.device}"} if site.A.device != device else set()
        for x, g, _ in site.chunks:
            if x.device != device:
                found.add(f"captured X on {x.device}")
            if g.device != device:
                found.add(f"captured sD on {g.device}")
        for key, value in self.state.get(site.B, {}).items():
            if isinstance(value, Tensor) and value.device != device:
                found.add(f"state {key!r} on {value.device}")
        if found:
            raise RuntimeError(f"{type(self).__name__}: LoRA layer {site.name!r} mixes devices: B on {device}, "
                               f"{', '.join(sorted(found))} (model moved between backward() and step(), or "
                               "after the state was created? move it before the first step, or reload the "
                               "state with load_state_dict); nothing was updated")

    def _find_nonfinite(self) -> Optional[str]:
        """What holds NaN/Inf among the captured X and sD (the factor gradients without capture)
        and the other parameters' ``.grad`` (None when all is finite). Raises RuntimeError,
        naming the layer, for a captured X modified in place since its backward pass and for
        a layer on mixed devices."""
        named: List[Tuple[str, Tensor]] = []
        for site in self._sites:
            if self._capture is None:
                for what, p in (("A", site.A), ("B", site.B)):
                    if p.grad is not None:
                        named.append((f"the gradient of {what} of LoRA layer {site.name!r}", p.grad))
                continue
            if site.chunks:
                self._check_devices(site)
            for (x, g, _), version in zip(site.chunks, site.x_versions):
                if x._version != version:
                    raise RuntimeError(f"{type(self).__name__}: the input X captured for LoRA layer "
                                       f"{site.name!r} was modified in place after its backward pass "
                                       "(a reused input buffer?); the step would use the wrong X. "
                                       "Nothing was updated")
                named += [(f"the captured X of LoRA layer {site.name!r}", x),
                          (f"the captured sD of LoRA layer {site.name!r}", g)]
        for group in self.param_groups[1:]:
            for p in group["params"]:
                if p.grad is not None:
                    named.append((f"the gradient of parameter {self._names.get(id(p), '?')!r}", p.grad))
        if not named:
            return None
        bad = first_nonfinite([t for _, t in named])
        return None if bad is None else named[bad][0]

    def _total_norm(self, inv_scale: float) -> float:
        """``sqrt(sum_layers ||G||_F^2 + sum_other ||grad||^2)`` (unscaled; see the class docstring)."""
        parts: List[Tensor] = []
        groups = self.param_groups
        if self._capture is not None:
            groups = self.param_groups[1:]
            for site in self._sites:
                if site.chunks:
                    parts.append(F.grad_sq_norm([(x, g) for x, g, _ in site.chunks]) * inv_scale**2)
        for group in groups:
            for p in group["params"]:
                if p.grad is not None:
                    parts.append(torch.linalg.vector_norm(p.grad, dtype=torch.float64).square())
        by_device: Dict[torch.device, List[Tensor]] = {}
        for t in parts:
            by_device.setdefault(t.device, []).append(t)
        return math.sqrt(sum(float(torch.stack(ts).sum()) for ts in by_device.values()))

    def _scale_grads(self, coeff: float) -> None:
        """Multiply the ``.grad`` that the step uses by the clip coefficient (the captured sD is
        scaled through ``_grad_coeff`` instead)."""
        groups = self.param_groups if self._capture is None else self.param_groups[1:]
        for group in groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.mul_(coeff)

    def _step_lora(self, group: dict) -> None:
        """Compute every reached layer's update, then write them all: a step that fails in any
        layer's solve leaves every factor and every state untouched. Layers whose update is a
        :class:`~oplora.optim.functional.Plan` are solved together by the step engine.

        On several ranks a layer reached on any rank is stepped on all (with no rows of its own
        where it was not reached), so that every rank takes part in the same reductions."""
        pending = []
        for index, site in enumerate(self._sites):
            chunks = [(x, g) for x, g, _ in site.chunks]
            if not chunks and self._rows.get(index, 0) > 0:
                chunks = [(site.A.new_zeros(0, site.A.shape[1]), site.B.new_zeros(0, site.B.shape[0]))]
            if chunks:
                pending.append((site, self._update_site(index, site, chunks, self.state.get(site.B, {}), group)))
        solved = iter(F.run_plans([u for _, u in pending if isinstance(u, F.Plan)], self._reduce))
        updates = [(site, next(solved) if isinstance(u, F.Plan) else u) for site, u in pending]
        F.commit([(update, site.B, site.A, self.state[site.B]) for site, update in updates])

    def _update_site(self, index: int, site: LoRASite, chunks, state: dict, group: dict):
        """The layer's :class:`~oplora.optim.functional.Update`, or a
        :class:`~oplora.optim.functional.Plan` for the step engine (``state`` is read, never
        written)."""
        raise NotImplementedError

    @staticmethod
    def _site_seed(group: dict, index: int) -> int:
        return (int(group["seed"]) * 1_000_003 + index) % (2**63 - 1)

    @staticmethod
    def _default_seed(seed: Optional[int]) -> int:
        """``seed``, or one drawn from torch's global generator (reproducible under manual_seed)."""
        if seed is None:
            return int(torch.randint(0, 2**62, (1,)).item())
        return _check_int(seed, "seed")
