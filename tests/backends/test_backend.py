"""Dispatch (``oplora.backends``): what runs where and why, the ``OPLORA_BACKEND`` switch, the
accessors ``load``/``reason``, a missing C++ extension that is reported, never silent
(``OPLORA_REQUIRE_EXT=1`` makes it an ImportError), and the Triton backend: not imported by
``import oplora``, reported without importing it, loaded (without touching CUDA) when CUDA tensors
first need it, unavailable with the reason when Triton cannot be imported, and dispatched only
for CUDA tensors."""

import os
import subprocess
import sys

import pytest
import torch
from backend_cases import kernels

import oplora
from oplora import backends as _backend


def _python(code, hide=(), env_extra=None):
    """Run ``code`` in a fresh interpreter after ``import torch, oplora``, with the modules in
    ``hide`` made unimportable and no oplora/Triton switch set but those in ``env_extra``."""
    prefix = "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in hide)
    env = {k: v for k, v in os.environ.items() if k not in ("OPLORA_REQUIRE_EXT", "OPLORA_BACKEND", "TRITON_INTERPRET")}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", prefix + "import torch, oplora\n" + code], capture_output=True,
                          text=True, env=env)


def test_backend_info_reports_what_runs_and_why():
    info = oplora.backend_info()
    assert info["requested"] == "auto"
    assert info["available"]["torch"] is True
    assert set(info["reasons"]) == {"torch", "cpp", "triton"}
    assert all(isinstance(v, str) and v for v in info["reasons"].values())
    if info["available"]["cpp"]:
        assert info["selected"]["cpu"] == "cpp"
        assert "oplora._cpu" in info["reasons"]["cpp"]


def test_the_accessors_give_each_backend_or_say_why_not():
    assert _backend.load("torch").name == "torch"
    assert "oplora.reference" in _backend.reason("torch")
    for name in _backend.NAMES:
        ops = _backend.load(name)
        assert ops is None or ops.name == name
        assert _backend.reason(name) == oplora.backend_info()["reasons"][name]
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        _backend.load("gpu")


@pytest.mark.skipif(os.environ.get("OPLORA_REQUIRE_EXT") != "1", reason="only where the extension is required")
def test_the_cpp_backend_runs_cpu_tensors_where_it_is_required():
    assert oplora.backend_info()["selected"]["cpu"] == "cpp"
    assert _backend.ops_for(torch.device("cpu")).name == "cpp"


def test_the_switch_picks_a_backend_or_says_why_it_cannot(monkeypatch):
    monkeypatch.setenv("OPLORA_BACKEND", "torch")
    assert _backend.ops_for(torch.device("cpu")).name == "torch"
    assert oplora.backend_info()["selected"] == {"cpu": "torch", "cuda": "torch"}
    monkeypatch.setenv("OPLORA_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="OPLORA_BACKEND=triton"):
        _backend.ops_for(torch.device("cpu"))
    assert oplora.backend_info()["selected"]["cpu"].startswith("none:")
    monkeypatch.setenv("OPLORA_BACKEND", "gpu-please")
    with pytest.raises(ValueError, match="OPLORA_BACKEND='gpu-please' is not one of"):
        oplora.backend_info()


def test_the_optimizer_refuses_a_backend_that_cannot_run(monkeypatch):
    model = torch.nn.Sequential(torch.nn.Linear(6, 5))
    oplora.add_lora(model, ["0"], r=2)
    opt = oplora.OPLoRA(model, lr=0.1)
    model(torch.randn(3, 6)).sum().backward()
    before = [p.detach().clone() for p in model.parameters()]
    monkeypatch.setenv("OPLORA_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="OPLORA_BACKEND=triton"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


# ------------------------------------------------------------------------------- the C++ extension

def _import_without_extension(env_extra):
    """Import oplora in a fresh interpreter where ``oplora._cpu`` cannot be imported."""
    return _python("info = oplora.backend_info()\n"
                   "print(info['available']['cpp'], info['selected']['cpu']); print(info['reasons']['cpp'])",
                   hide=["oplora._cpu"], env_extra=env_extra)


def test_a_missing_extension_is_reported_and_the_torch_ops_run():
    done = _import_without_extension({})
    assert done.returncode == 0, done.stderr
    available, selected = done.stdout.splitlines()[0].split()
    assert (available, selected) == ("False", "torch")
    assert "the C++ extension oplora._cpu did not load" in done.stdout
    assert "C++ CPU backend unavailable" in done.stderr  # logged, not swallowed


def test_require_ext_turns_a_missing_extension_into_an_import_error():
    done = _import_without_extension({"OPLORA_REQUIRE_EXT": "1"})
    assert done.returncode != 0
    assert "ImportError: OPLORA_REQUIRE_EXT=1 but the C++ extension oplora._cpu did not load" in done.stderr


# ------------------------------------------------------------------------------ the Triton backend

def test_import_loads_no_triton_touches_no_gpu_and_cpu_tensors_never_go_to_triton():
    done = _python("from oplora import backends as _backend\n"
                   "info = oplora.backend_info()\n"
                   "print('triton' in sys.modules, 'oplora_kernels' in sys.modules, torch.cuda.is_initialized(),\n"
                   "      _backend.ops_for(torch.device('cpu')).name, 'triton' in sys.modules)\n"
                   "print(info['available']['triton'], info['selected']['cuda']); print(info['reasons']['triton'])")
    assert done.returncode == 0, done.stderr
    first, second, reason = done.stdout.splitlines()
    triton_imported, kernels_imported, cuda_initialized, cpu_backend, triton_imported_after = first.split()
    assert (triton_imported, kernels_imported, cuda_initialized, triton_imported_after) == ("False",) * 4
    assert cpu_backend != "triton"
    if kernels is not None:
        assert second.split() == ["True", "triton"]
        assert reason == "Triton installed; loaded when CUDA tensors first need it"


@pytest.mark.skipif(kernels is None, reason="the Triton backend is unavailable")
def test_cuda_tensors_load_triton_without_touching_cuda():
    done = _python("from oplora import backends as _backend\n"
                   "name = _backend.ops_for(torch.device('cuda')).name\n"
                   "print(name, 'triton' in sys.modules, torch.cuda.is_initialized())\n"
                   "print(oplora.backend_info()['reasons']['triton'])")
    assert done.returncode == 0, done.stderr
    first, reason = done.stdout.splitlines()[:2]
    assert first.split() == ["triton", "True", "False"]
    assert reason.startswith(f"Triton {kernels.triton.__version__} kernels (oplora_kernels)")


@pytest.mark.skipif(kernels is None, reason="the Triton backend is unavailable")
def test_loaded_and_reported():
    from oplora.backends import triton_ops as _triton_ops

    assert _backend.load("triton") is _triton_ops.OPS and _triton_ops.OPS.name == "triton"
    info = oplora.backend_info()
    assert info["available"]["triton"] is True
    assert f"Triton {_triton_ops.triton.__version__}" in info["reasons"]["triton"]


@pytest.mark.skipif(kernels is None, reason="the Triton backend is unavailable")
def test_the_reason_says_where_it_can_run(monkeypatch):
    from oplora.backends import triton_ops as _triton_ops

    monkeypatch.setattr(_triton_ops._row_pass, "interpreting", lambda: True)
    assert "TRITON_INTERPRET=1" in _triton_ops.describe()
    monkeypatch.setattr(_triton_ops._row_pass, "interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "no CUDA device" in _triton_ops.describe()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _triton_ops.describe().endswith("CUDA tensors")


@pytest.mark.parametrize("hidden,before,after", [
    ("triton", "False torch Triton kernels unavailable: the triton package is not installed",
     "Triton kernels unavailable: import of triton halted"),
    ("oplora.backends.triton_ops", "True triton Triton installed; loaded when CUDA tensors first need it",
     "Triton kernels unavailable: import of oplora.backends.triton_ops halted"),
], ids=["triton-missing", "load-fails"])
def test_without_the_triton_backend_cuda_steps_use_torch_ops_and_say_why(hidden, before, after):
    """Triton not installed (unavailable from import on), or installed but the backend does not
    import (unavailable once a CUDA tensor needs it): the steps on CUDA tensors use the torch ops,
    and the reason -- logged, and in ``backend_info()`` -- is the ``ImportError``."""
    report = ("info = oplora.backend_info()\n"
              "print(info['available']['triton'], info['selected']['cuda'], info['reasons']['triton'])\n")
    done = _python(report + "from oplora import backends as _backend\n"
                   "print(_backend.ops_for(torch.device('cuda')).name, _backend.load('triton'))\n" + report,
                   hide=[hidden])
    assert done.returncode == 0, done.stderr
    first, loaded, last = done.stdout.splitlines()[:3]
    assert first == before
    assert loaded.split() == ["torch", "None"]
    assert last.startswith("False torch " + after)
    assert "Triton backend unavailable, CUDA steps use torch ops" in done.stderr


@pytest.mark.cuda
def test_cuda_tensors_go_to_triton_by_default(monkeypatch):
    monkeypatch.delenv("OPLORA_BACKEND", raising=False)
    assert _backend.ops_for(torch.device("cuda")).name == "triton"
