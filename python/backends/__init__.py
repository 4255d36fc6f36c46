"""The one place that decides how an op runs: Triton (CUDA), C++ (CPU) or pure torch.

Nothing else in the package branches on ``device.type`` or probes for native code. What a
backend provides is an :class:`oplora.backends.ops.Ops` (the ops of the optimizer step engine,
``oplora.optim.engine``, each specified by ``oplora.reference``); this module loads the
backends, picks one per device, and says why.

Backends:

* ``torch``: the pure-torch reference ops (``oplora.backends.ops.TORCH_OPS``); every device.
* ``cpp``: the C++ extension ``oplora._cpu`` (``csrc/``, through ``oplora.backends.cpu_ops``), CPU
  tensors. Loaded with ``oplora`` (it is small). It is optional but never silently missing: when
  it does not load, the reason is logged and shown by :func:`backend_info`, and
  ``OPLORA_REQUIRE_EXT=1`` turns it into an ``ImportError`` at ``import oplora``.
* ``triton``: the Triton kernels (``oplora_kernels``, through ``oplora.backends.triton_ops``), CUDA
  tensors. Loaded lazily -- Triton is most of what importing the package would otherwise cost
  -- when a CUDA tensor first needs it (:func:`ops_for` on a CUDA device), or when it is asked
  for by name (``OPLORA_BACKEND=triton``, :func:`load`). Until then :func:`backend_info` reports
  it from ``importlib.util.find_spec("triton")``, without importing Triton; a failed load is
  logged and reported with its ``ImportError``. Neither loading nor reporting initialises CUDA.

Precision policy (one place): rows may come in any float dtype; products accumulate in float32
(float64 when anything is float64). The torch and C++ backends upcast bfloat16/float16 rows to
float32 once per step, before the passes -- one float32 copy of X and sD, twice their bf16 bytes,
alive during ``step()``; the Triton kernels read bf16/fp16 directly and accumulate in fp32.

Environment switch: ``OPLORA_BACKEND=auto|torch|cpp|triton`` (default ``auto``: the fastest
available backend for the tensors' device). Asking for a backend that is not available raises a
``RuntimeError`` with the reason at the first call, never a silent fallback.

Code that wants one backend by name (benchmarks, tests) uses :func:`load` (its ops, or None) and
:func:`reason` (why it is or is not available).

The backends layer: this module (the dispatch), ``ops`` (the :class:`~oplora.backends.ops.Ops`
interface and the torch ops), ``cpu_ops`` (the C++ extension ``oplora._cpu`` as Ops),
``triton_ops`` (the Triton kernels of ``oplora_kernels`` as Ops) and ``cholqr`` (batched float64
CholeskyQR2, the Triton backend's thin QR). It depends on ``oplora.reference`` only; the step
engine (``oplora.optim.engine``) calls it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Callable, Dict, Optional, Tuple

import torch

from .ops import TORCH_OPS, Ops

__all__ = ["backend_info", "ops_for", "load", "reason", "NAMES"]

ENV_VAR = "OPLORA_BACKEND"
REQUIRE_EXT_VAR = "OPLORA_REQUIRE_EXT"
NAMES = ("torch", "cpp", "triton")
CHOICES = ("auto", *NAMES)

logger = logging.getLogger("oplora")


def _load_cpp() -> Tuple[Optional[Ops], str]:
    """The C++ backend, or None and why not."""
    try:
        from . import cpu_ops as _cpu_ops
    except ImportError as err:
        return None, f"the C++ extension oplora._cpu did not load: {err}"
    return _cpu_ops.OPS, _cpu_ops.describe()


def _load_triton() -> Tuple[Optional[Ops], str]:
    """The Triton backend, or None and why not. Importing it touches no GPU; the backend only
    ever receives CUDA tensors (``_DEVICES``), so on a machine without one it is available but
    never selected, and its reason says so."""
    try:
        from . import triton_ops as _triton_ops
    except ImportError as err:
        return None, f"Triton kernels unavailable: {err}"
    return _triton_ops.OPS, _triton_ops.describe()


_LOADERS: Dict[str, Callable[[], Tuple[Optional[Ops], str]]] = {"cpp": _load_cpp, "triton": _load_triton}
# What a failed load means for the steps (logged once, with the reason).
_FALLBACK = {"cpp": "C++ CPU backend unavailable, CPU steps use torch ops",
             "triton": "Triton backend unavailable, CUDA steps use torch ops"}
# Each loaded backend: its ops (None: unavailable) and why it is or is not available.
_LOADED: Dict[str, Tuple[Optional[Ops], str]] = {
    "torch": (TORCH_OPS, "pure-torch reference ops (oplora.reference); run on every device"),
}
# Which devices a backend can run on, and the preference order per device type under auto.
_DEVICES = {"torch": None, "cpp": ("cpu",), "triton": ("cuda",)}
_PREFERENCE = {"cuda": ("triton", "torch"), "cpu": ("cpp", "torch")}


def _check_name(name: str) -> None:
    if name not in NAMES:
        raise ValueError(f"unknown backend {name!r}: choose from {', '.join(NAMES)}")


def load(name: str) -> Optional[Ops]:
    """The ops of backend ``name`` (``torch``, ``cpp`` or ``triton``), loaded at the first
    request (for ``triton``: imports Triton, touches no GPU); None when it is unavailable, then
    :func:`reason` says why. Raises ``ValueError`` for an unknown name."""
    _check_name(name)
    if name not in _LOADED:
        ops, why = _LOADED[name] = _LOADERS[name]()
        if ops is None:
            logger.warning("oplora: %s: %s", _FALLBACK[name], why)
    return _LOADED[name][0]


def _triton_installed() -> Tuple[bool, str]:
    """Whether the Triton backend, not loaded yet, can be, and why (the only backend loaded
    lazily: the others are in ``_LOADED`` from import on); imports nothing."""
    if importlib.util.find_spec("triton") is None:
        return False, "Triton kernels unavailable: the triton package is not installed"
    return True, "Triton installed; loaded when CUDA tensors first need it"


def reason(name: str) -> str:
    """Why backend ``name`` is or is not available, without loading it."""
    _check_name(name)
    return _LOADED[name][1] if name in _LOADED else _triton_installed()[1]


def _available(name: str, loading: bool) -> bool:
    """Whether backend ``name`` is available: after loading it (``loading``), or as far as can be
    told without loading it (a backend not loaded yet counts when it is installed)."""
    if loading or name in _LOADED:
        return load(name) is not None
    return _triton_installed()[0]


def _requested() -> str:
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise ValueError(f"{ENV_VAR}={value!r} is not one of {', '.join(CHOICES)}")
    return value


def _select(device_type: str, loading: bool = True) -> str:
    """The backend for tensors of ``device_type``; with ``loading=False`` as predicted without
    loading anything (for :func:`backend_info`)."""
    requested = _requested()
    if requested != "auto":
        devices = _DEVICES[requested]
        if _available(requested, loading=False) and devices is not None and device_type not in devices:
            raise RuntimeError(f"{ENV_VAR}={requested} runs on {', '.join(devices)} tensors only, "
                               f"not on {device_type}")
        if not _available(requested, loading):
            raise RuntimeError(f"{ENV_VAR}={requested} but that backend is unavailable: {reason(requested)}")
        return requested
    for name in _PREFERENCE.get(device_type, ("torch",)):
        if _available(name, loading):
            return name
    return "torch"


def ops_for(device: torch.device) -> Ops:
    """The step-engine ops that run for tensors on ``device`` (loading the backend they need)."""
    ops = load(_select(torch.device(device).type))
    assert ops is not None  # _select returns only a backend that loaded
    return ops


def backend_info() -> dict:
    """What runs where, and why.

    Returns a dict with ``requested`` (the ``OPLORA_BACKEND`` value), ``selected`` (the backend
    of the optimizer step per device type: ``cpu``, ``cuda``), ``available`` (backend -> bool)
    and ``reasons`` (backend -> why it is or is not available). A backend not loaded yet (Triton
    before a CUDA tensor needed it) counts as available when it is installed; its reason says
    so. Loads nothing, imports no Triton, never initialises CUDA.
    """
    selected = {}
    for dev in ("cpu", "cuda"):
        try:
            selected[dev] = _select(dev, loading=False)
        except RuntimeError as err:
            selected[dev] = f"none: {err}"
    return {
        "requested": _requested(),
        "selected": selected,
        "available": {name: _available(name, loading=False) for name in NAMES},
        "reasons": {name: reason(name) for name in NAMES},
    }


# The C++ extension loads with the package (cheap); OPLORA_REQUIRE_EXT=1 makes its absence fatal.
if load("cpp") is None and os.environ.get(REQUIRE_EXT_VAR, "") == "1":
    raise ImportError(f"{REQUIRE_EXT_VAR}=1 but {reason('cpp')}")
