"""Grouped proximal solves (``oplora_kernels.prox_solve``: batched SVD per shape) against
``oplora.reference.prox_solve``, problem by problem: full-rank, rank-deficient and zero ``R``,
``lam = 0`` and ``lam > 0`` side by side in one batch, several shapes in one call."""

import pytest
import torch
from oplora import reference

from oplora_kernels import prox_solve as ps

TOL = 1e-12  # float64: the same formula, batched; only rounding differs


def problem(k, r, q, lam, p, rank=None, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    r_mat = torch.randn(k, r, generator=gen, dtype=torch.float64).triu()
    if rank is not None:
        u, s, vh = torch.linalg.svd(r_mat, full_matrices=False)
        s[rank:] = 0.0
        r_mat = (u * s) @ vh
    y = torch.randn(k, q, generator=gen, dtype=torch.float64)
    x0 = torch.randn(r, q, generator=gen, dtype=torch.float64)
    return r_mat.to(device), y.to(device), x0.to(device), lam, p


def assert_like_reference(problems):
    for prob, x in zip(problems, ps.prox_solve(problems)):
        want = reference.prox_solve(*prob)
        assert x.shape == want.shape and x.dtype == torch.float64
        assert float((x - want).abs().max()) <= TOL * max(1.0, float(want.abs().max()))


def test_mixed_batch_matches_reference():
    problems = [problem(6, 6, 11, 0.0, 40, seed=0), problem(6, 6, 11, 0.3, 40, seed=1),
                problem(6, 6, 11, 0.0, 40, rank=3, seed=2), problem(6, 6, 11, 1e-3, 90, rank=0, seed=3),
                problem(4, 4, 9, 0.0, 12, seed=4), problem(3, 5, 2, 0.0, 3, seed=5)]
    assert_like_reference(problems)


def test_zero_factor_keeps_the_start_point():
    prob = problem(5, 5, 7, 0.0, 30, rank=0)
    (x,) = ps.prox_solve([prob])
    assert torch.equal(x, prob[2])


def test_rejects_non_float64():
    r_mat, y, x0, lam, p = problem(3, 3, 2, 0.0, 10)
    with pytest.raises(ValueError, match="Y must be float64"):
        ps.prox_solve([(r_mat, y.float(), x0, lam, p)])


@pytest.mark.cuda
def test_cuda_mixed_batch_matches_reference():
    problems = [problem(16, 16, 4096, lam, 4096, rank=rank, seed=i, device="cuda")
                for i, (lam, rank) in enumerate([(0.0, None), (1e-2, None), (0.0, 5), (0.0, 0)])]
    assert_like_reference(problems)
