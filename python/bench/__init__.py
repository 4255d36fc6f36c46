"""``oplora-bench`` (also ``python -m oplora.bench``): the package's benchmarks.

Suites (``--suite``, each a module of this package with its own ``main(argv)`` and options):

* ``lorsum`` (default) -- LoRSum vs the full SVD and ``torch.svd_lowrank`` of the explicit
  matrix on OPLoRA step targets; see :mod:`oplora.bench.lorsum`.
* ``cpu`` -- one optimizer step per LoRA layer on the C++ backend vs the same math in torch ops
  vs the SVD baseline, at 2 threads and all threads; see :mod:`oplora.bench.cpu`.
* ``kernels`` -- the fused Triton step of a 7B-shaped LoRA stack against its bandwidth floor, the
  torch path and AdamW, and LoRSum vs SVD at 4096 x 4096 (CUDA); see :mod:`oplora.bench.kernels`.
* ``memory`` -- optimizer state, capture overhead and peak memory of OPLoRA, ScaledOPLoRA and
  AdamW on the same LoRA model, and against gradient accumulation (``--accumulation``); see
  :mod:`oplora.bench.memory`.
* ``model`` -- the whole-model training step (forward+backward and ``step()``) on a
  SmolLM2-135M-shaped model per optimizer, against its arithmetic floor; see
  :mod:`oplora.bench.model`.

One name per suite: ``--suite NAME`` runs the module ``oplora.bench.NAME``, also reachable as the
script ``bench/bench_NAME.py``, and writes ``bench/results/NAME[_device].{csv,md,png}`` (CSV and
markdown always, the PNG plot when matplotlib is installed) with the machine, versions, date and
command. ``oplora-bench --suite NAME --help`` lists a suite's options. Per-op micro-benchmarks
(pytest-benchmark) live beside the scripts: ``pytest bench/ --benchmark-only``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

__all__ = ["main", "SUITES"]

#: suite name -> module (imported only when that suite runs).
SUITES = {name: f"oplora.bench.{name}" for name in ("lorsum", "cpu", "kernels", "memory", "model")}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point: run the suite ``--suite`` names (default ``lorsum``); returns its
    exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--suite", choices=sorted(SUITES), default="lorsum")
    known, _ = pre.parse_known_args(argv)
    return importlib.import_module(SUITES[known.suite]).main(argv)
