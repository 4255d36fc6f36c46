"""Micro-benchmark of ``row_pass`` (``oplora.backends.ops.Ops.row_pass``) per backend: one LoRA layer's pass
over its captured rows X (T x n) and sD (T x m) with the step's and the momentum's right-hand
sides side by side (``K = 2r`` columns on each side) and the diagonal K-FAC statistics -- the
pass of a ScaledOPLoRA step that reads the rows, the op that dominates a step. And a whole
model's pass (``test_row_pass_many_layers``): one call with one job per LoRA layer, as the step
engine makes it -- many small layers, where what a call costs beyond its arithmetic shows.

Rows in float32 on the CPU, bfloat16 on a GPU (what a bf16 model captures), given to each backend
as its ``rows`` op makes them (outside the timing). ``extra_info["row_bytes"]`` is the bytes of
the rows one pass must read: time / (row_bytes / bandwidth) is how far from the memory floor it
runs. Run, and where the JSON goes: see bench/conftest.py (``pytest bench/bench_row_pass.py
--benchmark-only``).
"""

import pytest
import torch

from oplora import backends as _backend
from oplora.bench._smollm import SMOLLM2_135M

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


def attention_layers(config):
    """(m, n) of every attention LoRA layer of a Llama-shaped model: q, k, v, o per block (k, v
    are narrower under grouped-query attention)."""
    width = config["hidden_size"]
    kv = width * config["num_key_value_heads"] // config["num_attention_heads"]
    return [(m, width) for _ in range(config["num_hidden_layers"]) for m in (width, kv, kv, width)]


# A whole model's pass: (model, its layers' (m, n), T rows each, rank r, which side). The step engine
# makes one call per pass: the A-side half-steps of every layer (qd), then the B-side ones (qx).
MODELS = [("smollm2-135m-attn", attention_layers(SMOLLM2_135M), 512, 8, side) for side in ("qd", "qx")]


@pytest.mark.parametrize("model", MODELS, ids=lambda c: f"{c[0]}-L{len(c[1])}-T{c[2]}-r{c[3]}-{c[4]}")
def test_row_pass_many_layers(backend, model, device, measure, benchmark):
    _, layers, t, r, side = model
    ops = _backend.load(backend)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device).manual_seed(0)
    jobs = []
    for m, n in layers:
        x = torch.randn(t, n, generator=gen, device=device).to(dtype)
        g = torch.randn(t, m, generator=gen, device=device).to(dtype)
        q = torch.randn(m if side == "qd" else n, 2 * r, generator=gen, device=device)
        qd, qx = (q, None) if side == "qd" else (None, q)
        jobs.append(([ops.rows(x, torch.float32)], [ops.rows(g, torch.float32)], qd, qx, False))
    benchmark.extra_info.update(rows_dtype=str(dtype), layers=len(layers),
                                row_bytes=sum(t * (m + n) for m, n in layers) * jobs[0][0][0].element_size())
    out = measure(ops.row_pass, jobs)
    assert len(out) == len(layers) and all((p is None) == (side == "qx") for p, *_ in out)
