"""oplora: OPLoRA / LoRSum LoRA optimizers for PyTorch.

OPLoRA takes, at Adam's memory, the step that full fine-tuning would take projected back to
rank r (what a truncated SVD would give), without forming an m x n matrix or running an SVD:
``lorsum`` solves a proximal least-squares problem by one or two alternating half-steps.

Public API:
    lorsum(terms, coeffs, init, *, iters=1, prox=0.0, metric=None, precondition=None, start="A")
    OPLoRA, ScaledOPLoRA, SVDLoRA, RiemannianLoRA  -- optimizers built from a model
    create_optimizer(model, name="oplora" | "scaled" | "svd" | "riemannian", **kwargs)  -- by name
    LoRALinear, add_lora  -- LoRA for plain PyTorch models (PEFT models work as they are)
    backend_info()  -- which implementation runs on which device, and why
    capture_memory(model_or_config, tokens=..., ...)  -- what the optimizers hold between backward
        and step, per capture mode, next to AdamW (counted, nothing allocated)
"""

from .backends import backend_info
from .factory import create_optimizer
from .layers import LoRALinear, add_lora
from .memory_model import capture_memory
from .lorsum import lorsum
from .optim import OPLoRA, RiemannianLoRA, ScaledOPLoRA, SVDLoRA

__version__ = "0.1.0"

__all__ = [
    "lorsum",
    "OPLoRA",
    "ScaledOPLoRA",
    "SVDLoRA",
    "RiemannianLoRA",
    "create_optimizer",
    "LoRALinear",
    "add_lora",
    "backend_info",
    "capture_memory",
    "__version__",
]
