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

Layers, lowest first (each imports only those below it; ``docs/architecture.md``):
    the math       ``lorsum`` (public, validated) over ``reference`` (pure torch, float64-exact:
                   the specification every backend is tested against); ``layers`` (LoRA without
                   PEFT) and the leaf helpers ``_checks``, ``_dtensor`` beside it
    backends       ``oplora.backends``: which implementation runs an op on which device
                   (C++ ``oplora._cpu`` on CPU, Triton ``oplora_kernels`` on CUDA, torch anywhere)
    capture        ``oplora.capture``: what every LoRA layer saw in forward and backward, held for
                   the step (``memory_model``: what is held, counted before training)
    optimizers     ``oplora.optim`` (``factory``: by name)
    benchmarks     ``oplora.bench`` (``oplora-bench``)
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
