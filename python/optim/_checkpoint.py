"""``load_state_dict``: what a checkpoint must hold before anything of it is loaded.

A state loaded as it is would fail later and far away -- a momentum of the wrong shape inside the
C++ binding at the next step, NaN or negative K-FAC statistics in ``linalg.svd`` -- or not at all:
a layer's state with a missing entry silently restarts that entry. So :func:`validate` reads the
whole ``state_dict`` first and refuses it with a ``ValueError`` naming the layer (or parameter)
and the key, before the optimizer changes:

* the LoRA group holds every hyper-parameter of this optimizer (a checkpoint of another
  optimizer class does not);
* per LoRA layer with a state (a layer never stepped has none): every entry its settings need
  (``LoRAOptimizer._state_spec``, read with the checkpoint's own hyper-parameters, which are the
  ones loaded), each a floating tensor of the layer's shape with finite values, the step a
  non-negative integer, the K-FAC statistics non-negative (diagonal) or symmetric with a
  non-negative diagonal (dense);
* per parameter stepped by a torch optimizer (the other parameters; RiemannianLoRA's factors):
  its moment buffers (``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``, ``momentum_buffer``) of the
  parameter's shape, finite.

Under FSDP2 the state tensors may be DTensors (shards): each is checked whole, on every rank.
A checkpoint whose groups or parameter counts differ is left to ``torch.optim.Optimizer``, which
refuses it the same way (ValueError, nothing loaded).
"""

from __future__ import annotations

import numbers
from typing import Optional, Tuple

import torch
from torch import Tensor

from .._dtensor import is_dtensor

__all__ = ["validate", "keep_dtypes"]

#: Per-parameter buffers of the torch optimizers that have the parameter's shape.
_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")
_STATISTICS = ("d_in", "d_out")
#: Hyper-parameters a checkpoint may lack (older versions had none), with the value the version
#: that wrote it used (not today's default, which may differ).
LEGACY = {"master_factors": False, "bias_correction": False, "relative_damping": False, "relative_prox": False,
          "current_floor": False, "precondition_momentum": False}
_OPTIONAL = tuple(LEGACY)


def _refuse(owner: str, where: str, key: str, what: str) -> ValueError:
    return ValueError(f"{owner}.load_state_dict: {where}, state {key!r}: {what}; nothing was loaded")


def _check_step(owner: str, where: str, value) -> None:
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise _refuse(owner, where, "step", f"{value!r} is not a non-negative integer")


def _check_tensor(owner: str, where: str, key: str, value, shape: Tuple[int, ...]) -> None:
    if is_dtensor(value):  # FSDP2 shards: every rank checks the whole tensor, so all decide alike
        value = value.full_tensor()
    if not isinstance(value, Tensor) or not value.is_floating_point():
        raise _refuse(owner, where, key, f"expected a floating-point tensor, got {type(value).__name__}"
                      + (f" of {value.dtype}" if isinstance(value, Tensor) else ""))
    if tuple(value.shape) != tuple(shape):
        raise _refuse(owner, where, key, f"shape {tuple(value.shape)}, expected {tuple(shape)}")
    if not bool(torch.isfinite(value).all()):
        raise _refuse(owner, where, key, "holds NaN or Inf")
    if key in _STATISTICS:
        if value.dim() == 1:
            if bool((value < 0).any()):
                raise _refuse(owner, where, key, f"negative K-FAC statistics (min {float(value.min()):.3g})")
        else:
            scale = float(value.abs().max())
            if float((value - value.mT).abs().max()) > 1e-5 * scale or bool((value.diagonal() < 0).any()):
                raise _refuse(owner, where, key, "a dense K-FAC statistic that is not symmetric with a "
                                                 "non-negative diagonal")


def _lora_entry(owner: str, site, entry: Optional[dict], spec: dict) -> None:
    if not entry:
        return  # never stepped: it starts afresh, as it would have
    where = f"LoRA layer {site.name!r}"
    for key, shape in spec.items():
        if key not in entry:
            raise _refuse(owner, where, key, f"missing (the layer's state holds {sorted(entry)}); the entry would "
                                             "restart silently")
        if shape is None:
            _check_step(owner, where, entry[key])
        else:
            _check_tensor(owner, where, key, entry[key], shape)


def validate(opt, state_dict: dict) -> None:
    """Raise ``ValueError`` (naming the layer or parameter and the key) when ``state_dict`` is not
    a consistent state of ``opt`` (module docstring); modifies nothing."""
    owner = type(opt).__name__
    if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
        raise ValueError(f"{owner}.load_state_dict: expected the dict state_dict() returns (keys 'state' and "
                         f"'param_groups'), got {type(state_dict).__name__}; nothing was loaded")
    groups, state = state_dict["param_groups"], state_dict["state"]
    if len(groups) != len(opt.param_groups) or any(len(s["params"]) != len(g["params"])
                                                   for s, g in zip(groups, opt.param_groups)):
        return  # torch.optim.Optimizer.load_state_dict refuses it, naming the mismatch
    lora = groups[0]
    missing = sorted(key for key in opt._hyper if key not in lora and key not in _OPTIONAL)
    if missing:
        raise ValueError(f"{owner}.load_state_dict: the checkpoint's LoRA group lacks the hyper-parameters "
                         f"{missing}: it is not a state of {owner}; nothing was loaded")
    if opt.uses_capture:
        for index, site in enumerate(opt._sites):
            entry = state.get(lora["params"][2 * index + 1])
            _lora_entry(owner, site, entry, opt._state_spec(site, lora))
    for saved, group in zip(groups, opt.param_groups):
        if opt.uses_capture and group["kind"] == "lora":
            continue
        for pid, p in zip(saved["params"], group["params"]):
            entry = state.get(pid) or {}
            where = f"parameter {opt._names.get(id(p), '?')!r}"
            for key in _MOMENTS:
                if key in entry:
                    _check_tensor(owner, where, key, entry[key], tuple(p.shape))


def keep_dtypes(opt, state_dict: dict) -> None:
    """After ``torch.optim.Optimizer.load_state_dict`` (which casts state to the parameter's
    dtype): the LoRA layers' state tensors in the dtype they were saved with (the K-FAC statistics
    and float32 masters of bf16 factors), on the factor's device."""
    saved, lora = state_dict["state"], state_dict["param_groups"][0]["params"]
    for index, site in enumerate(opt._sites):
        entry = saved.get(lora[2 * index + 1])
        if not entry:
            continue
        own = opt.state[site.B]
        for key, value in entry.items():
            if isinstance(value, Tensor) and isinstance(own.get(key), Tensor) and own[key].dtype != value.dtype:
                own[key] = value.to(device=site.B.device, copy=True)
