"""The backends a test runs on, as pytest parameters: every backend of ``oplora.backends`` that can
run CPU tensors here (``_backend.load(name)`` gives its ops), skipped with the reason where it
cannot.

``torch`` always; ``cpp`` when the extension loads; ``triton`` through the Triton interpreter when
``TRITON_INTERPRET=1`` (set by conftest on a machine without a GPU). Loading the Triton backend
here imports Triton, never CUDA. ``kernels`` is ``oplora_kernels.row_pass`` (None without
Triton), for the tests of the launcher itself; ``interpreted``/``compiled`` mark its CPU and
GPU tests.
"""

import pytest

from oplora import backends as _backend

kernels = None
if _backend.load("triton") is not None:
    from oplora_kernels import row_pass as kernels

if kernels is None:
    TRITON_SKIP = f"Triton backend unavailable: {_backend.reason('triton')}"
elif not kernels.interpreting():
    TRITON_SKIP = "CPU tensors run the kernels through the Triton interpreter: needs TRITON_INTERPRET=1"
else:
    TRITON_SKIP = ""


def _skip_reason(name):
    if name == "triton":
        return TRITON_SKIP
    return "" if _backend.load(name) is not None else f"backend {name} unavailable: {_backend.reason(name)}"


def cpu_backends(*names):
    """``pytest.param(name)`` for each backend in ``names`` (default: all), skipped with the
    reason where it cannot run CPU tensors."""
    return [pytest.param(name, id=name, marks=pytest.mark.skipif(bool(_skip_reason(name)), reason=_skip_reason(name)))
            for name in names or _backend.NAMES]


# Kernel launches on CPU tensors need the interpreter (conftest sets it); the GPU tests need the
# compiled kernels: TRITON_INTERPRET=0 python -m pytest -m cuda tests/
interpreted = pytest.mark.skipif(bool(TRITON_SKIP), reason=TRITON_SKIP)
compiled = pytest.mark.skipif(kernels is None or kernels.interpreting(),
                              reason="GPU kernels are tested compiled: needs Triton and TRITON_INTERPRET=0")


def use_backend(backend, device, monkeypatch):
    """Steps of ``device`` tensors run on ``backend``: by the ``OPLORA_BACKEND`` switch, or, for
    the Triton kernels on CPU tensors (interpreter), by handing its ops to the engine."""
    if backend == "triton" and device == "cpu":
        ops = _backend.load("triton")
        monkeypatch.setattr(_backend, "ops_for", lambda _device: ops)
    else:
        monkeypatch.setenv("OPLORA_BACKEND", backend)
