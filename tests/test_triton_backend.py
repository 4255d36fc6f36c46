"""The Triton backend in ``oplora._backend``: loaded from ``oplora._triton_ops`` without touching
CUDA, reported with its reason by ``backend_info()``, unavailable (with the reason) when Triton
cannot be imported, and dispatched only for CUDA tensors."""

import os
import subprocess
import sys

import pytest
import torch

import oplora
from oplora import _backend, _triton_ops


def _import_oplora(code, hide_triton=False):
    prefix = "import sys; sys.modules['triton'] = None\n" if hide_triton else ""
    env = {k: v for k, v in os.environ.items() if k not in ("OPLORA_REQUIRE_EXT", "OPLORA_BACKEND",
                                                            "TRITON_INTERPRET")}
    return subprocess.run([sys.executable, "-c", prefix + "import torch, oplora\n" + code], capture_output=True,
                          text=True, env=env)


def test_loaded_and_reported():
    info = oplora.backend_info()
    assert info["available"]["triton"] is True
    assert f"Triton {_triton_ops.triton.__version__}" in info["reasons"]["triton"]
    assert _backend._OPS["triton"] is _triton_ops.OPS and _triton_ops.OPS.name == "triton"


def test_the_reason_says_where_it_can_run(monkeypatch):
    monkeypatch.setattr(_triton_ops._row_pass, "interpreting", lambda: True)
    assert "TRITON_INTERPRET=1" in _triton_ops.describe()
    monkeypatch.setattr(_triton_ops._row_pass, "interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "no CUDA device" in _triton_ops.describe()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _triton_ops.describe().endswith("CUDA tensors")


def test_import_touches_no_gpu_and_cpu_tensors_never_go_to_triton():
    done = _import_oplora("from oplora import _backend\n"
                          "print(torch.cuda.is_initialized(), _backend.ops_for(torch.device('cpu')).name)")
    assert done.returncode == 0, done.stderr
    initialized, cpu_backend = done.stdout.split()
    assert initialized == "False" and cpu_backend != "triton"


def test_without_triton_the_backend_is_unavailable_with_the_reason():
    done = _import_oplora("info = oplora.backend_info()\n"
                          "print(info['available']['triton']); print(info['reasons']['triton'])", hide_triton=True)
    assert done.returncode == 0, done.stderr
    available, reason = done.stdout.splitlines()[:2]
    assert available == "False" and "Triton kernels unavailable" in reason and "triton" in reason


@pytest.mark.cuda
def test_cuda_tensors_go_to_triton_by_default(monkeypatch):
    monkeypatch.delenv("OPLORA_BACKEND", raising=False)
    assert _backend.ops_for(torch.device("cuda")).name == "triton"
