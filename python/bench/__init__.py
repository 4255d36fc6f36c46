"""``oplora-bench`` (also ``python -m oplora.bench``): the package's benchmarks.

Suites (``--suite``): ``lorsum`` (default) -- LoRSum vs the full SVD and ``torch.svd_lowrank``
of the explicit matrix on OPLoRA step targets; see :mod:`oplora.bench.lorsum`. Results (CSV,
markdown table, PNG plot) go to ``bench/results/`` with the machine, versions, date and command.
"""

from .lorsum import main

__all__ = ["main"]
