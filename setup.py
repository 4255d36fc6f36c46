"""Build script. All metadata lives in pyproject.toml.

The C++ CPU fallback (csrc/, described by CMakeLists.txt) will be built from here by a
CMake-driving ``build_ext``; until it exists the package is pure Python.
"""

from setuptools import setup

setup()
