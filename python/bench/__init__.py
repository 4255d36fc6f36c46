"""``oplora-bench`` (also ``python -m oplora.bench``): the package's benchmarks.

Suites (``--suite``, each a module of this package with its own ``main(argv)`` and options):

* ``lorsum`` (default) -- LoRSum vs the full SVD and ``torch.svd_lowrank`` of the explicit
  matrix on OPLoRA step targets; see :mod:`oplora.bench.lorsum`.
* ``cpu`` -- one optimizer step per LoRA layer on the C++ backend vs the same math in torch ops
  vs the SVD baseline, at 2 threads and all threads; see :mod:`oplora.bench.cpu`.
* ``gpu`` -- the fused Triton step of a 7B-shaped LoRA stack against its bandwidth floor, the
  torch path and AdamW, and LoRSum vs SVD at 4096 x 4096 (CUDA); see :mod:`oplora.bench.kernels`.
* ``memory`` -- optimizer state, capture overhead and peak memory of OPLoRA, ScaledOPLoRA and
  AdamW on the same LoRA model; see :mod:`oplora.bench.memory`.

Results (CSV, markdown table, PNG plot) go to ``bench/results/`` with the machine, versions,
date and command. ``oplora-bench --suite NAME --help`` lists a suite's options.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

__all__ = ["main", "SUITES"]

#: suite name -> module (imported only when that suite runs).
SUITES = {
    "lorsum": "oplora.bench.lorsum",
    "cpu": "oplora.bench.cpu",
    "gpu": "oplora.bench.kernels",
    "memory": "oplora.bench.memory",
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point: run the suite ``--suite`` names (default ``lorsum``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--suite", choices=sorted(SUITES), default="lorsum")
    known, _ = pre.parse_known_args(argv)
    return importlib.import_module(SUITES[known.suite]).main(argv)
