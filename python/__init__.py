"""oplora: OPLoRA / LoRSum LoRA optimizers for PyTorch.

OPLoRA takes, at Adam's memory, the step that full fine-tuning would take projected back to
rank r (what a truncated SVD would give), without forming an m x n matrix or running an SVD:
``lorsum`` solves a proximal least-squares problem by one or two alternating half-steps.

Public API:
    lorsum(terms, coeffs, init, *, iters=1, prox=0.0, metric=None, precondition=None, start="A")
    backend_info()  -- which implementation runs on which device, and why
"""

from ._backend import backend_info
from .lorsum import lorsum

__version__ = "0.1.0"

__all__ = ["lorsum", "backend_info", "__version__"]
