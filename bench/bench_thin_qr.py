"""Micro-benchmark of ``thin_qr`` (``oplora.backends.ops.Ops.thin_qr``) per backend: the reduced QR of a
group's weighted factors, a stack of ``b`` same-shaped tall-skinny float64 matrices (p x r), as the
step engine hands them over once per half-step of a group of ``b`` same-shaped layers.

The torch (and C++) backend factors the stack by Householder (LAPACK/cuSOLVER), the Triton
backend by batched CholeskyQR2 (``oplora.backends.cholqr``). Run, and where the JSON goes: see
bench/conftest.py (``pytest bench/bench_thin_qr.py --benchmark-only``).
"""

import torch

from oplora import backends as _backend

OP = "thin_qr"
FIELDS = ("b", "p", "r")  # a group of b layers, 4 to 32; each p x r, 768 to 11008 by 8 or 16
SHAPES = {"cpu": [(4, 768, 8), (32, 768, 16), (32, 4096, 16)], "cuda": [(4, 768, 8), (32, 4096, 16), (32, 11008, 16)]}


def test_thin_qr(backend, shape, device, measure, benchmark):
    b, p, r = shape
    z = torch.randn(b, p, r, dtype=torch.float64, generator=torch.Generator(device).manual_seed(0), device=device)
    benchmark.extra_info.update(bytes=z.numel() * z.element_size())
    (q, r_mat), = measure(_backend.load(backend).thin_qr, [z])
    assert q.shape == (b, p, r) and r_mat.shape == (b, r, r)
