"""The package builds as a wheel without torch in the build requirements, with the layout the
package-dir mapping promises (``python/`` -> ``oplora``, ``oplora_kernels/``) and the
``oplora-bench`` console script."""

import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python >= 3.11")

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_build_requirements_never_pull_torch():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert not [r for r in meta["build-system"]["requires"] if r.lower().startswith("torch")]
    torch_reqs = [r for r in meta["project"]["dependencies"] if r.lower().startswith("torch")]
    assert torch_reqs == ["torch>=2.1"]  # satisfied by the CPU 2.13 here and the CUDA 2.11 on the GPU image


def test_wheel_contains_both_packages_and_the_console_script(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "CMakeLists.txt", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("python", "oplora_kernels", "csrc"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    out = tmp_path / "wheel"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out), str(src)], check=True, capture_output=True)
    (wheel,) = out.glob("oplora-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ("oplora/__init__.py", "oplora/reference.py", "oplora/_backend.py", "oplora/lorsum.py",
                   "oplora/capture.py", "oplora/layers.py", "oplora/optim/__init__.py",
                   "oplora/optim/functional.py", "oplora/bench/__init__.py", "oplora/bench/__main__.py", "oplora/bench/lorsum.py",
                   "oplora_kernels/__init__.py"):
        assert module in names, module
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "oplora-bench = oplora.bench:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
