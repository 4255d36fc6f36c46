"""Configuration of the op micro-benchmarks ``bench/bench_<op>.py`` (pytest-benchmark).

Run from the repository root::

    pytest bench/ --benchmark-only                 # all ops; JSON in bench/results/ops_<device>.json
    pytest bench/bench_row_pass.py --benchmark-only
    pytest bench/ --benchmark-disable              # each benchmark once, untimed (what the tests run)

Each module names its op (``OP``: ``row_pass``, ``thin_qr`` or ``prox_solve`` of
``oplora.backends.ops.Ops``) and its shapes per device (``SHAPES``, named by ``FIELDS``); this file
parametrizes every benchmark over them and over the backends that run on the benchmark device
(CUDA when torch sees a GPU, else the CPU): ``torch`` and ``cpp`` on the CPU, ``torch`` and
``triton`` on a GPU -- the compiled kernels only: under ``TRITON_INTERPRET=1`` Triton is left out,
the interpreter is for correctness tests, never for timing. A backend whose op is the same
function as an earlier backend's (the C++ backend's ``thin_qr`` and ``prox_solve`` are the torch
ones) is timed once, under the first name. The fixture ``measure(fn, *args)`` calls ``fn`` once
to warm up (Triton compiles at its first launch), then times it, synchronising CUDA after every
call.

Results: unless ``--benchmark-json PATH`` is given or nothing is timed (``--benchmark-disable``,
``--collect-only``), the run writes ``bench/results/ops_<device>.json``, pytest-benchmark's JSON
(every round's time and the statistics per benchmark, with its parameters and ``extra_info``), whose
``machine_info`` carries here also the torch version, torch's thread count, the device's name
and every backend's reason (``oplora.backends.reason``: the extension's path, the Triton
version). Two runs compare with ``pytest-benchmark compare``.
"""

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from oplora import backends as _backend

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# The backends that run tensors of each device type (oplora.backends dispatches the same way).
CANDIDATES = {"cpu": ("torch", "cpp"), "cuda": ("torch", "triton")}
# Without pytest-benchmark (the test extra) there is nothing to run here.
collect_ignore_glob = [] if importlib.util.find_spec("pytest_benchmark") else ["bench_*.py"]


def _runs_here(name):
    ops = _backend.load(name)
    if ops is None or name != "triton":
        return ops is not None
    from oplora_kernels import row_pass

    return not row_pass.interpreting()


def backends(op):
    """The backends that time ``op`` on :data:`DEVICE`, each distinct function once."""
    names, seen = [], []
    for name in CANDIDATES[DEVICE.type]:
        if _runs_here(name):
            fn = getattr(_backend.load(name), op)
            if fn not in seen:
                seen.append(fn)
                names.append(name)
    return names


def pytest_generate_tests(metafunc):
    op = getattr(metafunc.module, "OP", None)
    if op is None:
        return
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", backends(op))
    if "shape" in metafunc.fixturenames:
        fields = metafunc.module.FIELDS
        metafunc.parametrize("shape", metafunc.module.SHAPES[DEVICE.type],
                             ids=lambda shape: "-".join(f"{k}{v}" for k, v in zip(fields, shape)))


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    option = config.option
    if getattr(option, "benchmark_json", "missing") is None and not (option.benchmark_disable or option.collectonly):
        os.makedirs(RESULTS, exist_ok=True)
        option.benchmark_json = Path(RESULTS) / f"ops_{DEVICE.type}.json"


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["torch"] = torch.__version__
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["device"] = torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "cpu"
    machine_info["backends"] = {name: _backend.reason(name) for name in _backend.NAMES}


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def measure(benchmark):
    """``measure(fn, *args)``: warm up with one call, then benchmark ``fn(*args)``, each call
    followed by a CUDA synchronisation on a GPU; returns ``fn``'s result."""
    def call(fn, *args):
        out = fn(*args)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize(DEVICE)
        return out

    def run(fn, *args):
        call(fn, *args)
        return benchmark(call, fn, *args)

    return run
