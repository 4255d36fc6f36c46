"""The one place that decides how an op runs: Triton (CUDA), C++ (CPU) or pure torch.

Nothing else in the package branches on ``device.type`` or probes for native code. Today the
pure-torch reference (``oplora.reference``) is the only backend; the C++ CPU fallback and the
Triton kernels plug in here when they exist, and ``backend_info()`` says what runs and why.

Environment switch: ``OPLORA_BACKEND=auto|torch|cpp|triton`` (default ``auto``: the fastest
available backend for the tensors' device). Asking for a backend that is not available raises
a ``RuntimeError`` with the reason at the first call, never a silent fallback.
"""

from __future__ import annotations

import os
from typing import Callable, Dict

import torch

from . import reference

__all__ = ["backend_info", "lorsum_impl"]

ENV_VAR = "OPLORA_BACKEND"
CHOICES = ("auto", "torch", "cpp", "triton")

# Each backend: whether it can run, and why (or why not). Filled once, at import, without
# touching a GPU.
_AVAILABLE: Dict[str, bool] = {"torch": True, "cpp": False, "triton": False}
_REASONS: Dict[str, str] = {
    "torch": "pure-torch reference (oplora.reference); runs on every device",
    "cpp": "not in this version of oplora: the C++ CPU fallback (csrc/) is not implemented yet",
    "triton": "not in this version of oplora: the Triton kernels (oplora_kernels/) are not implemented yet",
}
_OPS: Dict[str, Dict[str, Callable]] = {"torch": {"lorsum": reference.lorsum}}
# Preference order per device type when OPLORA_BACKEND=auto.
_PREFERENCE = {"cuda": ("triton", "torch"), "cpu": ("cpp", "torch")}


def _requested() -> str:
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise ValueError(f"{ENV_VAR}={value!r} is not one of {', '.join(CHOICES)}")
    return value


def _select(device_type: str) -> str:
    requested = _requested()
    if requested != "auto":
        if not _AVAILABLE[requested]:
            raise RuntimeError(f"{ENV_VAR}={requested} but that backend is unavailable: {_REASONS[requested]}")
        return requested
    for name in _PREFERENCE.get(device_type, ("torch",)):
        if _AVAILABLE[name]:
            return name
    return "torch"


def lorsum_impl(device: torch.device) -> Callable:
    """The LoRSum implementation that runs for tensors on ``device`` (validated input only)."""
    return _OPS[_select(torch.device(device).type)]["lorsum"]


def backend_info() -> dict:
    """What runs where, and why.

    Returns a dict with ``requested`` (the ``OPLORA_BACKEND`` value), ``selected`` (backend per
    device type: ``cpu``, ``cuda``), ``available`` (backend -> bool) and ``reasons``
    (backend -> why it is or is not available). Never initialises CUDA.
    """
    selected = {}
    for dev in ("cpu", "cuda"):
        try:
            selected[dev] = _select(dev)
        except RuntimeError as err:
            selected[dev] = f"none: {err}"
    return {
        "requested": _requested(),
        "selected": selected,
        "available": dict(_AVAILABLE),
        "reasons": dict(_REASONS),
    }
