"""Micro-benchmark of ``row_pass`` (``oplora._ops.Ops.row_pass``) per backend: one LoRA layer's pass
over its captured rows X (T x n) and sD (T x m) with the step's and the momentum's right-hand
sides side by side (``K = 2r`` columns on each side) and the diagonal K-FAC statistics -- the
pass of a ScaledOPLoRA step that reads the rows, the op that dominates a step.

Rows in float32 on the CPU, bfloat16 on a GPU (what a bf16 model captures), given to each backend
as its ``rows`` op makes them (outside the timing). ``extra_info["row_bytes"]`` is the bytes of
the rows one pass must read: time / (row_bytes / bandwidth) is how far from the memory floor it
runs. Run, and where the JSON goes: see bench/conftest.py (``pytest bench/bench_row_pass.py
--benchmark-only``).
"""

import torch

from oplora import _backend

OP = "row_pass"
# T rows of an m x n layer, rank r: LoRA layers of 0.1B-7B models (768 to 4096 wide, an MLP's
# 11008), 512 to 4096 tokens; the CPU ones sized for a 2-core machine.
FIELDS = ("T", "m", "n", "r")
SHAPES = {"cpu": [(512, 768, 768, 8), (2048, 2048, 2048, 16), (2048, 1024, 4096, 16)],
          "cuda": [(512, 768, 768, 8), (2048, 4096, 4096, 16), (4096, 4096, 4096, 16), (4096, 11008, 4096, 16)]}


def test_row_pass(backend, shape, device, measure, benchmark):
    t, m, n, r = shape
    ops = _backend.load(backend)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device).manual_seed(0)
    x = torch.randn(t, n, generator=gen, device=device).to(dtype)
    g = torch.randn(t, m, generator=gen, device=device).to(dtype)
    qd = torch.randn(m, 2 * r, generator=gen, device=device)
    qx = torch.randn(n, 2 * r, generator=gen, device=device)
    job = ([ops.rows(x, torch.float32)], [ops.rows(g, torch.float32)], qd, qx, True)
    benchmark.extra_info.update(rows_dtype=str(dtype), row_bytes=t * (m + n) * x.element_size())
    (px, pd, sx, sg), = measure(ops.row_pass, [job])
    assert px.shape == (n, 2 * r) and pd.shape == (m, 2 * r) and sx.shape == (n,) and sg.shape == (m,)
