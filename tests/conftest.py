"""Test configuration shared by every test module.

On a machine without a GPU, TRITON_INTERPRET=1 is set before anything can import Triton, so that
the Triton kernels run on the CPU through the interpreter (correctness only: programs run one at a
time, fp32 dots are exact, no bf16 tl.dot). Tests marked ``cuda`` need a GPU and are skipped, with
the reason, without one; no test module touches CUDA at import.

The tests mirror the package by layer: ``lorsum/`` (the LoRSum math against its float64
reference), ``backends/`` (every op on every backend, the Triton compile), ``capture/`` (what each
layer kind records and holds), ``optim/`` (the optimizers, their guards and the training loop),
``stacks/`` (the HF Trainer, TRL, Lightning, torchtune, DDP, FSDP2), ``bench/`` and ``examples/``;
at the top, the packaging, the docs' links and commands, and the layout itself. Shared helpers:
``backend_cases`` (which backends a test runs on), ``explicit`` (dense-matrix formulas),
``tolerances``.
"""

import os

import pytest
import torch

# Before any kernel module is imported: without a GPU the Triton kernels run through the
# interpreter; with one they compile (and the CUDA-marked tests run them). An explicit
# TRITON_INTERPRET in the environment wins. torch.cuda.is_available() creates no CUDA context.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is visible to torch on this machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
