"""Build script: a CMake-driving ``build_ext`` (pybind11 cmake_example style). Metadata lives in
pyproject.toml; the C++ build is described by CMakeLists.txt alone.

The extension ``oplora._cpu`` (csrc/) is optional: when it cannot be built (no compiler, no CMake),
the package still installs and runs on the torch ops, and ``oplora.backend_info()`` says why the
extension is missing. With ``OPLORA_REQUIRE_EXT=1`` in the environment a failed build is an error.
``CMAKE_ARGS`` (space-separated) is passed through to CMake, e.g. ``-DOPLORA_NATIVE=OFF``.
"""

import os
import shlex
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str, sourcedir: Path = ROOT):
        super().__init__(name, sources=[])
        self.sourcedir = str(sourcedir)


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        try:
            self._cmake(ext)
        except (OSError, subprocess.CalledProcessError) as err:
            if os.environ.get("OPLORA_REQUIRE_EXT", "") == "1":
                raise
            # Optional extension: the package works without it (torch ops on CPU).
            print(f"oplora: WARNING: the C++ extension {ext.name} was not built ({err}); "
                  "CPU steps will use torch ops. Set OPLORA_REQUIRE_EXT=1 to make this an error.", file=sys.stderr)

    def _cmake(self, ext: CMakeExtension) -> None:
        import pybind11

        extdir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_temp = Path(self.build_temp) / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)
        config = "Debug" if self.debug else "Release"
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}{os.sep}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DPYTHON_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={config}",
            "-G", "Ninja",
        ]
        args += shlex.split(os.environ.get("CMAKE_ARGS", ""))
        subprocess.run(["cmake", ext.sourcedir, *args], cwd=build_temp, check=True)
        subprocess.run(["cmake", "--build", ".", "--config", config], cwd=build_temp, check=True)


setup(ext_modules=[CMakeExtension("oplora._cpu")], cmdclass={"build_ext": CMakeBuild})
