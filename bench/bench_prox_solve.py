"""Micro-benchmark of ``prox_solve`` (``oplora.backends.ops.Ops.prox_solve``) per backend: the r x r
proximal solves of one half-step of a group of ``b`` same-shaped layers, the step's and the
momentum's side by side (two stacks of ``b`` problems ``(R, Y, X0, lam, p)``, R r x r, Y and X0
r x q, float64), as the step engine hands them over.

The torch (and C++) backend solves each stack with one batched reference call, the Triton
backend both stacks in one. Run, and where the JSON goes: see bench/conftest.py
(``pytest bench/bench_prox_solve.py --benchmark-only``).
"""

import torch

from oplora import backends as _backend

OP = "prox_solve"
FIELDS = ("b", "r", "q")  # a group of b layers, 4 to 32; R r x r (r 8 or 16), Y and X0 r x q (768 to 11008)
SHAPES = {"cpu": [(4, 8, 768), (32, 16, 768), (32, 16, 4096)], "cuda": [(4, 8, 768), (32, 16, 4096), (32, 16, 11008)]}


def test_prox_solve(backend, shape, device, measure, benchmark):
    b, r, q = shape
    gen = torch.Generator(device).manual_seed(0)

    def stack(lam):
        eye = torch.eye(r, dtype=torch.float64, device=device)
        r_mat = torch.randn(b, r, r, dtype=torch.float64, generator=gen, device=device).triu() + r * eye
        y, x0 = (torch.randn(b, r, q, dtype=torch.float64, generator=gen, device=device) for _ in range(2))
        return r_mat, y, x0, lam, 4 * q

    problems = [stack(0.0), stack(1e-2)]
    benchmark.extra_info.update(problems=2 * b)
    out = measure(_backend.load(backend).prox_solve, problems)
    assert [tuple(x.shape) for x in out] == [(b, r, q)] * 2
