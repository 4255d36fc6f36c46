"""The one place that decides how an op runs: Triton (CUDA), C++ (CPU) or pure torch.

Nothing else in the package branches on ``device.type`` or probes for native code.

What a backend provides (:class:`Ops`), the ops of the optimizer step engine
(``oplora.optim.engine``), each specified by ``oplora.reference``:

* ``row_pass(jobs)``: for each job ``(xs, gs, qd, qx, stats)`` of one layer, the thin products
  ``G^T qd``, ``G qx`` of its implicit gradient and its diagonal K-FAC statistics, reading the
  rows once (``reference.row_pass``); one call for all layers of a step;
* ``rows(t, dtype)``: the captured rows as ``row_pass`` takes them (see the precision policy);
* ``thin_qr(Zs)`` and ``prox_solve(problems)``: the float64 r-sized work of the half-steps, one
  call for all half-steps of a pass (``reference.thin_qr``, ``reference.prox_solve`` per item;
  an item is a stack of same-shaped matrices, one per layer of a group);

Backends:

* ``torch``: the pure-torch reference ops; every device.
* ``cpp``: the C++ extension ``oplora._cpu`` (``csrc/``), CPU tensors. It is optional but never
  silently missing: when it does not load, the reason is logged and shown by
  :func:`backend_info`, and ``OPLORA_REQUIRE_EXT=1`` turns it into an ``ImportError``.
* ``triton``: the Triton kernels (``oplora_kernels``), CUDA tensors.

Precision policy (one place): rows may come in any float dtype; products accumulate in float32
(float64 when anything is float64). The torch and C++ backends upcast bfloat16/float16 rows to
float32 once per step, before the passes -- one float32 copy of X and sD, twice their bf16 bytes,
alive during ``step()``; the Triton kernels read bf16/fp16 directly and accumulate in fp32.

Environment switch: ``OPLORA_BACKEND=auto|torch|cpp|triton`` (default ``auto``: the fastest
available backend for the tensors' device). Asking for a backend that is not available raises a
``RuntimeError`` with the reason at the first call, never a silent fallback.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import reference

__all__ = ["backend_info", "ops_for", "Ops"]

ENV_VAR = "OPLORA_BACKEND"
REQUIRE_EXT_VAR = "OPLORA_REQUIRE_EXT"
CHOICES = ("auto", "torch", "cpp", "triton")

logger = logging.getLogger("oplora")

Job = Tuple[Sequence[Tensor], Sequence[Tensor], Optional[Tensor], Optional[Tensor], bool]
PassResult = Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor]]
SmallProblem = Tuple[Tensor, Tensor, Tensor, float, int]  # (R, Y, X0, lam, p) of reference.prox_solve


class Ops(NamedTuple):
    """The ops of one backend (see the module docstring)."""

    name: str
    rows: Callable[[Tensor, torch.dtype], Tensor]
    row_pass: Callable[[Sequence[Job]], List[PassResult]]
    thin_qr: Callable[[Sequence[Tensor]], List[Tuple[Tensor, Tensor]]]
    prox_solve: Callable[[Sequence[SmallProblem]], List[Tensor]]


def _torch_rows(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t.to(dtype)


TORCH_OPS = Ops(
    name="torch",
    rows=_torch_rows,
    row_pass=lambda jobs: [reference.row_pass(*job) for job in jobs],
    thin_qr=lambda zs: [reference.thin_qr(z) for z in zs],
    prox_solve=lambda problems: [reference.prox_solve(*p) for p in problems],
)


def _load_cpp() -> Tuple[Optional[Ops], str]:
    """The C++ backend, or None and why not."""
    try:
        from . import _cpu_ops
    except ImportError as err:
        return None, f"the C++ extension oplora._cpu did not load: {err}"
    return _cpu_ops.OPS, _cpu_ops.describe()


def _load_triton() -> Tuple[Optional[Ops], str]:
    """The Triton backend, or None and why not. Importing it touches no GPU; the backend only
    ever receives CUDA tensors (``_DEVICES``), so on a machine without one it is available but
    never selected, and its reason says so."""
    try:
        from . import _triton_ops
    except ImportError as err:
        return None, f"Triton kernels unavailable: {err}"
    return _triton_ops.OPS, _triton_ops.describe()


_CPP_OPS, _CPP_REASON = _load_cpp()
if _CPP_OPS is None:
    if os.environ.get(REQUIRE_EXT_VAR, "") == "1":
        raise ImportError(f"{REQUIRE_EXT_VAR}=1 but {_CPP_REASON}")
    logger.warning("oplora: C++ CPU backend unavailable, CPU steps use torch ops: %s", _CPP_REASON)
_TRITON_OPS, _TRITON_REASON = _load_triton()

# Each backend: its ops (None: unavailable) and why it is or is not available. Filled once, at
# import, without touching a GPU.
_OPS: Dict[str, Optional[Ops]] = {"torch": TORCH_OPS, "cpp": _CPP_OPS, "triton": _TRITON_OPS}
_REASONS: Dict[str, str] = {
    "torch": "pure-torch reference ops (oplora.reference); run on every device",
    "cpp": _CPP_REASON,
    "triton": _TRITON_REASON,
}
# Which devices a backend can run on, and the preference order per device type under auto.
_DEVICES = {"torch": None, "cpp": ("cpu",), "triton": ("cuda",)}
_PREFERENCE = {"cuda": ("triton", "torch"), "cpu": ("cpp", "torch")}


def _requested() -> str:
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise ValueError(f"{ENV_VAR}={value!r} is not one of {', '.join(CHOICES)}")
    return value


def _select(device_type: str) -> str:
    requested = _requested()
    if requested != "auto":
        if _OPS[requested] is None:
            raise RuntimeError(f"{ENV_VAR}={requested} but that backend is unavailable: {_REASONS[requested]}")
        devices = _DEVICES[requested]
        if devices is not None and device_type not in devices:
            raise RuntimeError(f"{ENV_VAR}={requested} runs on {', '.join(devices)} tensors only, "
                               f"not on {device_type}")
        return requested
    for name in _PREFERENCE.get(device_type, ("torch",)):
        if _OPS[name] is not None:
            return name
    return "torch"


def ops_for(device: torch.device) -> Ops:
    """The step-engine ops that run for tensors on ``device``."""
    return _OPS[_select(torch.device(device).type)]


def backend_info() -> dict:
    """What runs where, and why.

    Returns a dict with ``requested`` (the ``OPLORA_BACKEND`` value), ``selected`` (the backend
    of the optimizer step per device type: ``cpu``, ``cuda``), ``available`` (backend -> bool)
    and ``reasons`` (backend -> why it is or is not available). Never initialises CUDA.
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
        "available": {name: ops is not None for name, ops in _OPS.items()},
        "reasons": dict(_REASONS),
    }
