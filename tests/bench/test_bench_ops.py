"""The op micro-benchmarks (``bench/bench_<op>.py``, pytest-benchmark) run: ``pytest bench/
--benchmark-disable`` calls every benchmark once, untimed, on every backend and shape of this
machine's device, and writes no results."""

import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("pytest_benchmark", reason="the op benchmarks need pytest-benchmark (the test extra)")

ROOT = pathlib.Path(__file__).resolve().parents[2]
OPS = ("row_pass", "thin_qr", "prox_solve")


def test_every_op_benchmark_runs_once():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "pytest", "bench/", "--benchmark-disable", "-q", "-p",
                           "no:cacheprovider", "-rA"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for op in OPS:
        assert f"bench/bench_{op}.py::test_{op}[torch-" in done.stdout, op
    assert "skipped" not in done.stdout.splitlines()[-1]
    assert "Wrote benchmark data" not in done.stdout
