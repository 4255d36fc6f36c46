"""Test configuration shared by every test module.

TRITON_INTERPRET=1 is set before anything can import Triton, so that the Triton kernels run on
the CPU through the interpreter (correctness only: programs run one at a time, fp32 dots are
exact, no bf16 tl.dot). Tests marked ``cuda`` need a GPU and are skipped, with the reason,
without one; no test module touches CUDA at import.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


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
