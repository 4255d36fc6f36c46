"""Dispatch (``oplora._backend``): what runs where, the ``OPLORA_BACKEND`` switch, and a missing
C++ extension that is reported, never silent (``OPLORA_REQUIRE_EXT=1`` makes it an ImportError)."""

import os
import subprocess
import sys

import pytest
import torch

import oplora
from oplora import _backend


def test_backend_info_reports_what_runs_and_why():
    info = oplora.backend_info()
    assert info["requested"] == "auto"
    assert info["available"]["torch"] is True
    assert set(info["reasons"]) == {"torch", "cpp", "triton"}
    assert all(isinstance(v, str) and v for v in info["reasons"].values())
    if info["available"]["cpp"]:
        assert info["selected"]["cpu"] == "cpp"
        assert "oplora._cpu" in info["reasons"]["cpp"]


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


def _import_without_extension(env_extra):
    """Import oplora in a fresh interpreter where ``oplora._cpu`` cannot be imported."""
    code = ("import sys; sys.modules['oplora._cpu'] = None\n"
            "import oplora; info = oplora.backend_info()\n"
            "print(info['available']['cpp'], info['selected']['cpu']); print(info['reasons']['cpp'])")
    env = {k: v for k, v in os.environ.items() if k not in ("OPLORA_REQUIRE_EXT", "OPLORA_BACKEND")}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)


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
