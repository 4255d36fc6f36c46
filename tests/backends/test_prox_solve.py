"""``prox_solve`` on every backend against ``oplora.reference.prox_solve``, problem by problem.

The torch and C++ backends solve item by item with the reference; the Triton backend merges the
stacks of one shape into one batched reference call (``lam``/``p`` per matrix). Full-rank,
rank-deficient and zero ``R``, ``lam = 0`` and ``lam > 0`` side by side in one batch, several
shapes in one call, single matrices and stacks mixed; and the reference itself on a stack, each
problem with its own cutoff. Bounds: tests/tolerances.py.
"""

import pytest
import torch
from backend_cases import cpu_backends, kernels
from tolerances import assert_close

from oplora import backends as _backend, reference

F64 = torch.float64


def problem(k, r, q, lam, p, rank=None, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    r_mat = torch.randn(k, r, generator=gen, dtype=F64).triu()
    if rank is not None:
        u, s, vh = torch.linalg.svd(r_mat, full_matrices=False)
        s[rank:] = 0.0
        r_mat = (u * s) @ vh
    y = torch.randn(k, q, generator=gen, dtype=F64)
    x0 = torch.randn(r, q, generator=gen, dtype=F64)
    return r_mat.to(device), y.to(device), x0.to(device), lam, p


def assert_like_reference(backend, problems):
    for prob, x in zip(problems, _backend.load(backend).prox_solve(problems)):
        want = reference.prox_solve(*prob)
        assert x.shape == want.shape and x.dtype == F64
        assert_close(x, want, "prox_solve", F64)


@pytest.mark.parametrize("backend", cpu_backends())
def test_mixed_batch_matches_reference(backend):
    problems = [problem(6, 6, 11, 0.0, 40, seed=0), problem(6, 6, 11, 0.3, 40, seed=1),
                problem(6, 6, 11, 0.0, 40, rank=3, seed=2), problem(6, 6, 11, 1e-3, 90, rank=0, seed=3),
                problem(4, 4, 9, 0.0, 12, seed=4), problem(3, 5, 2, 0.0, 3, seed=5)]
    assert_like_reference(backend, problems)


@pytest.mark.parametrize("backend", cpu_backends())
def test_zero_factor_keeps_the_start_point(backend):
    prob = problem(5, 5, 7, 0.0, 30, rank=0)
    (x,) = _backend.load(backend).prox_solve([prob])
    assert torch.equal(x, prob[2])


@pytest.mark.parametrize("backend", cpu_backends())
def test_stacks_and_matrices_mixed(backend):
    singles = [problem(6, 6, 11, 0.1, 40, seed=i, rank=(None if i % 2 else 2)) for i in range(5)]
    stack = tuple(torch.stack([prob[j] for prob in singles[:3]]) for j in range(3)) + (0.1, 40)
    out = _backend.load(backend).prox_solve([stack, singles[3], singles[4]])
    assert out[0].shape == (3, 6, 11)
    for x, prob in zip([*out[0], out[1], out[2]], singles):
        assert_close(x, reference.prox_solve(*prob), "prox_solve", F64)


def test_reference_on_a_stack_solves_each_problem_with_its_own_cutoff():
    """One stack holding a full-rank, a rank-deficient and a zero R: each problem keeps the start
    point exactly along its own zero directions, as the problem alone would."""
    singles = [problem(5, 5, 7, 0.0, 30, seed=0), problem(5, 5, 7, 0.0, 30, rank=2, seed=1),
               problem(5, 5, 7, 0.0, 30, rank=0, seed=2)]
    stacked = reference.prox_solve(*(torch.stack([prob[j] for prob in singles]) for j in range(3)), 0.0, 30)
    for x, prob in zip(stacked, singles):
        assert_close(x, reference.prox_solve(*prob), "prox_solve", F64)
    assert torch.equal(stacked[2], singles[2][2])


@pytest.mark.cuda
@pytest.mark.skipif(kernels is None, reason="the Triton backend is unavailable")
def test_cuda_mixed_batch_matches_reference():
    problems = [problem(16, 16, 4096, lam, 4096, rank=rank, seed=i, device="cuda")
                for i, (lam, rank) in enumerate([(0.0, None), (1e-2, None), (0.0, 5), (0.0, 0)])]
    assert_like_reference("triton", problems)
