"""The package builds as a wheel without torch in the build requirements, with the layout the
package-dir mapping promises (``python/`` -> ``oplora``, ``oplora_kernels/``) and the
``oplora-bench`` console script."""

import os
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


def _pip_wheel(tmp_path, env):
    """``pip wheel`` of a copy of the source tree (no build products); returns the finished process."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "CMakeLists.txt", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("python", "oplora_kernels", "csrc"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.so"))
    return subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v",
                           "-w", str(tmp_path / "wheel"), str(src)], capture_output=True, text=True, env=env)


def _build_wheel(tmp_path, env):
    done = _pip_wheel(tmp_path, env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (wheel,) = (tmp_path / "wheel").glob("oplora-*.whl")
    return set(zipfile.ZipFile(wheel).namelist()), wheel, done.stdout + done.stderr


def test_wheel_contains_both_packages_the_extension_and_the_console_script(tmp_path):
    names, wheel, _ = _build_wheel(tmp_path, env={**os.environ, "OPLORA_REQUIRE_EXT": "1"})
    # every module of the source tree, in every layer's subpackage (pyproject's package list)
    sources = [f"oplora/{p.relative_to(ROOT / 'python').as_posix()}" for p in (ROOT / "python").rglob("*.py")]
    sources += [p.relative_to(ROOT).as_posix() for p in (ROOT / "oplora_kernels").rglob("*.py")]
    assert "oplora/capture/capture.py" in sources and "oplora/backends/__init__.py" in sources
    for module in sources:
        assert module in names, module
    assert [n for n in names if n.startswith("oplora/_cpu.") and n.endswith(".so")], sorted(names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "oplora-bench = oplora.bench:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_without_a_compiler_the_wheel_builds_without_the_extension(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "OPLORA_REQUIRE_EXT"}
    env["CXX"] = str(tmp_path / "no-such-compiler")
    names, _, log = _build_wheel(tmp_path, env=env)
    assert "oplora/backends/__init__.py" in names
    assert not [n for n in names if n.startswith("oplora/_cpu.")]
    assert "the C++ extension oplora._cpu was not built" in log


def test_without_a_compiler_and_require_ext_the_build_fails(tmp_path):
    env = {**os.environ, "OPLORA_REQUIRE_EXT": "1", "CXX": str(tmp_path / "no-such-compiler")}
    assert _pip_wheel(tmp_path, env).returncode != 0
