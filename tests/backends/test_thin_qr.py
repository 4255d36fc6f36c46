"""``thin_qr`` on every backend against the ``oplora.reference.thin_qr`` contract: ``Z = Q R``,
orthonormal ``Q``, upper-triangular ``R`` (Householder's, up to the signs of its rows), for
well-conditioned, ill-conditioned (cond 1e4 in float32 factors, SPEC section 2), rank-deficient,
zero and wide matrices, many shapes in one call, single matrices and stacks mixed.

The torch and C++ backends run the reference (Householder, LAPACK); the Triton backend runs the
batched CholeskyQR2 of ``oplora.backends.cholqr`` (plain torch, Householder fallback), whose acceptance
test is checked on its own. Bounds: tests/tolerances.py.
"""

import pytest
import torch
from backend_cases import cpu_backends
from tolerances import assert_close

from oplora import reference
from oplora import backends as _backend
from oplora.backends import cholqr as _cholqr

F64 = torch.float64


def with_condition(p, r, cond, seed, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(p, r, generator=gen, dtype=F64))
    v, _ = torch.linalg.qr(torch.randn(r, r, generator=gen, dtype=F64))
    s = torch.logspace(0, -torch.log10(torch.tensor(float(cond))).item(), r, dtype=F64)
    return ((u * s) @ v.mT).to(device)


def check_contract(z, q, r_mat):
    k = min(z.shape)
    assert q.shape == (z.shape[0], k) and r_mat.shape == (k, z.shape[1])
    assert q.dtype == F64 and r_mat.dtype == F64
    assert_close(q @ r_mat, z, "thin_qr.residual", F64, scale=max(z.shape))
    assert_close(q.mT @ q, torch.eye(k, dtype=F64, device=q.device), "thin_qr.orthogonality", F64, scale=k)
    assert torch.equal(r_mat, r_mat.triu())


def check_same_r_as_householder(z, r_mat):
    """R is unique up to the signs of its rows for a full-rank Z."""
    _, r_ref = reference.thin_qr(z)
    signs = torch.sign(torch.diagonal(r_ref)) * torch.sign(torch.diagonal(r_mat))
    assert_close(signs[:, None] * r_mat, r_ref, "thin_qr.r", F64)


@pytest.mark.parametrize("backend", cpu_backends())
def test_many_shapes_and_conditions_in_one_call(backend):
    zs = [with_condition(57, 5, 10.0, 0), with_condition(57, 5, 1e4, 1), with_condition(33, 16, 1e4, 2),
          with_condition(57, 5, 1e6, 3), with_condition(8, 8, 1e2, 4), with_condition(33, 16, 3.0, 5)]
    for z, (q, r_mat) in zip(zs, _backend.load(backend).thin_qr(zs)):
        check_contract(z, q, r_mat)
        check_same_r_as_householder(z, r_mat)


@pytest.mark.parametrize("backend", cpu_backends())
def test_rank_deficient_zero_and_wide_matrices(backend):
    base = with_condition(30, 4, 10.0, 0)
    deficient = torch.cat([base[:, :2], base[:, :2]], 1)  # rank 2
    zero = torch.zeros(30, 4, dtype=F64)
    wide = torch.randn(3, 4, dtype=F64)
    zs = [base, deficient, zero, wide]
    out = _backend.load(backend).thin_qr(zs)
    for z, (q, r_mat) in zip(zs, out):
        check_contract(z, q, r_mat)
    # Rank-deficient: the trailing diagonal of R is rounding noise, as Householder's.
    assert float(torch.diagonal(out[1][1])[2:].abs().max()) <= 1e-12 * float(deficient.abs().max())
    assert float(out[2][1].abs().max()) == 0.0


@pytest.mark.parametrize("backend", cpu_backends())
def test_stacks_and_matrices_of_one_shape_together(backend):
    """The engine hands a group's factors over as stacks: two stacks and a single matrix of one
    shape (one CholeskyQR2 call on the Triton backend), one of them rank-deficient (Householder
    fallback inside a stack), come back stacked like their input."""
    first = torch.stack([with_condition(40, 6, 1e4, i) for i in range(3)])
    second = torch.stack([with_condition(40, 6, 10.0, 3), torch.zeros(40, 6, dtype=F64)])
    second[1, :, :3] = first[0, :, :3]  # rank 3
    single = with_condition(40, 6, 1e2, 4)
    other = torch.stack([with_condition(21, 4, 1e2, 5)])
    out = _backend.load(backend).thin_qr([first, single, second, other])
    assert [tuple(q.shape) for q, _ in out] == [(3, 40, 6), (40, 6), (2, 40, 6), (1, 21, 4)]
    pairs = [(z, q, r) for stack, (qs, rs) in zip([first, second, other], [out[0], out[2], out[3]])
             for z, q, r in zip(stack, qs, rs)] + [(single, *out[1])]
    for z, q, r_mat in pairs:
        check_contract(z, q, r_mat)


@pytest.mark.parametrize("backend", cpu_backends())
def test_a_rank_deficient_factor_solves_like_the_reference(backend):
    """End to end through the solve: B = 0 (LoRA init) keeps the start point, as the reference."""
    z = torch.zeros(20, 3, dtype=F64)
    x0 = torch.randn(3, 7, dtype=F64)
    (q, r_mat), = _backend.load(backend).thin_qr([z])
    y = q.mT @ torch.randn(20, 7, dtype=F64)
    for lam in (0.0, 0.1):
        assert torch.equal(reference.prox_solve(r_mat, y, x0, lam, 20), x0)


def test_cholesky_qr2_accepts_well_conditioned_and_rejects_rank_deficient():
    good = with_condition(40, 6, 1e4, 0)
    deficient = good.clone()
    deficient[:, 3] = deficient[:, 1]
    hopeless = with_condition(40, 6, 1e12, 1)
    zero = torch.zeros(40, 6, dtype=F64)
    q, r_mat, ok = _cholqr.cholesky_qr2(torch.stack([good, deficient, hopeless, zero]))
    assert ok.tolist() == [True, False, False, True]
    check_contract(good, q[0], r_mat[0])
    assert torch.equal(q[3], torch.eye(40, 6, dtype=F64)) and float(r_mat[3].abs().max()) == 0.0
    assert torch.isfinite(q).all() and torch.isfinite(r_mat).all()
    with pytest.raises(ValueError, match="p >= r"):
        _cholqr.cholesky_qr2(torch.zeros(1, 3, 5, dtype=F64))


@pytest.mark.cuda
def test_cuda_many_shapes():
    zs = [with_condition(4096, 16, 1e4, i, "cuda") for i in range(3)]
    zs += [with_condition(11008, 16, 1e2, 5, "cuda"), torch.zeros(4096, 16, dtype=F64, device="cuda")]
    for z, (q, r_mat) in zip(zs, _cholqr.thin_qr(zs)):
        check_contract(z, q, r_mat)
