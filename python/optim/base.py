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
* ``step(closure)``, ``zero_grad()`` (which also releases the captured tensors) and ``close()``.

Subclasses implement ``_update_site`` (one layer's update from its captured chunks) and
validate their hyper-parameters with the ``_check_*`` helpers.
"""

from __future__ import annotations

import math
import numbers
import operator
import warnings
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

    Raises ``TypeError`` for a non-module model and ``ValueError`` when the model has no
    trainable LoRA layer.
    """

    #: whether the subclass needs X and sD (False: it works from autograd's factor gradients).
    uses_capture = True

    def __init__(self, model: nn.Module, defaults: dict, *, other: OtherSpec = "adamw",
                 other_kwargs: Optional[dict] = None, strict: bool = False):
        if not isinstance(model, nn.Module):
            raise TypeError(f"{type(self).__name__} is built from the model (an nn.Module), got "
                            f"{type(model).__name__}; it finds the LoRA layers itself")
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
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            # Each rank would step on its own rows while DDP averages the other parameters'
            # gradients: the replicas would drift apart. Refuse rather than train wrong.
            raise RuntimeError(f"{type(self).__name__} does not reduce over torch.distributed process "
                               "groups yet; train in one process per model")
        lora_params = [p for site in sites for p in (site.A, site.B)]
        super().__init__([{"params": lora_params, "kind": "lora"}], defaults)
        self._inv_scale = 1.0
        self._sites: List[LoRASite] = sites
        self._inner: Dict[str, torch.optim.Optimizer] = {}
        seen = {id(p) for p in lora_params}
        other_params = []
        for p in model.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                other_params.append(p)
        if other_params:
            inner = _build_inner(other, other_params, defaults["lr"], other_kwargs, "other")
            group = {"params": other_params, "kind": "other"}
            self.param_groups.append(group)
            self._share("other", inner, group)
        self._capture = Capture(sites, owner=self) if self.uses_capture else None
        self._built = True

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
        enabled before the update. Captured tensors are released afterwards.

        Under ``torch.amp.GradScaler`` (``scaler.step(opt)``): a step whose gradients hold inf/NaN
        is skipped whole (factors, momentum, statistics, other parameters); otherwise the captured
        sD and every ``.grad`` are unscaled before the update. ``scaler.unscale_(opt)`` before
        ``scaler.step(opt)`` is refused (it unscales ``.grad`` only, not the captured sD).

        Raises ``FloatingPointError`` naming the layer, before anything moves, when a captured X or
        sD holds NaN/Inf outside AMP, and ``RuntimeError`` when a captured X was modified in place
        after its backward pass.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        try:
            with torch.no_grad():
                inv_scale = self._amp_inverse_scale()
                if inv_scale is None:  # GradScaler found inf/NaN: skip the step, as torch optimizers do
                    return loss
                self._check_captured()
                if inv_scale != 1.0:
                    self._unscale_grads(inv_scale)
                self._inv_scale = inv_scale
                self._step_lora(self.lora_group)
                if "other" in self._inner:
                    self._inner["other"].step()
        finally:
            self._inv_scale = 1.0
            if self._capture is not None:
                self._capture.clear()
        return loss

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
    def _check_captured(self) -> None:
        """Refuse, naming the layer, a captured X changed in place since its backward pass
        (RuntimeError) or a captured X or sD with NaN/Inf (FloatingPointError)."""
        if self._capture is None:
            return
        tensors: List[Tuple[LoRASite, str, Tensor]] = []
        for site in self._sites:
            for (x, g, _), version in zip(site.chunks, site.x_versions):
                if x._version != version:
                    raise RuntimeError(f"{type(self).__name__}: the input X captured for LoRA layer "
                                       f"{site.name!r} was modified in place after its backward pass "
                                       "(a reused input buffer?); the step would use the wrong X. "
                                       "Nothing was updated")
                tensors += [(site, "X", x), (site, "sD", g)]
        if not tensors:
            return
        bad = first_nonfinite([t for _, _, t in tensors])
        if bad is not None:
            site, what, _ = tensors[bad]
            raise FloatingPointError(f"{type(self).__name__}: the captured {what} of LoRA layer "
                                     f"{site.name!r} holds NaN or Inf; nothing was updated")

    def _step_lora(self, group: dict) -> None:
        """Compute every reached layer's update, then write them all: a step that fails in any
        layer's solve leaves every factor and every state untouched. Layers whose update is a
        :class:`~oplora.optim.functional.Plan` are solved together by the step engine."""
        pending = []
        for index, site in enumerate(self._sites):
            if site.chunks:
                chunks = [(x, g) for x, g, _ in site.chunks]
                pending.append((site, self._update_site(index, site, chunks, self.state.get(site.B, {}), group)))
        solved = iter(F.run_plans([u for _, u in pending if isinstance(u, F.Plan)]))
        updates = [(site, next(solved) if isinstance(u, F.Plan) else u) for site, u in pending]
        for site, update in updates:
            update.apply(site.B, site.A, self.state[site.B])

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
