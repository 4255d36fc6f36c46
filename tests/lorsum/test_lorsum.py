"""oplora.lorsum against the explicit float64 oracle (tests/explicit.py) and SPEC section 2; bad input
and dispatch: ``test_lorsum_input``."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import oplora
from explicit import TOL, explicit_lorsum, explicit_target, rel_err, spd, truncated_svd, with_condition

F64 = torch.float64

# (m, n, r, k): odd shapes, including r > n (the B side is then rank-deficient) and m < r.
SHAPES = [(37, 23, 5, 11), (64, 7, 9, 3), (4, 29, 6, 17)]
PROX = [0.0, 1e-3, 10.0]
METRICS = ["none", "diag", "diag-pre", "dense", "dense-pre", "out-only", "in-only-pre"]


def make_problem(m, n, r, k, dtype=F64, metric="none"):
    b0 = torch.randn(m, r, dtype=dtype)
    a0 = torch.randn(r, n, dtype=dtype)
    d = torch.randn(m, k, dtype=dtype)
    x = torch.randn(k, n, dtype=dtype)
    mom_u, mom_v = torch.randn(m, 2, dtype=dtype), torch.randn(2, n, dtype=dtype)
    terms = [(b0, a0), (d, x), (mom_u, mom_v)]
    coeffs = [1.0, -0.3, -0.1]
    kw = {}
    if metric.startswith("diag"):
        kw["metric"] = (torch.rand(m, dtype=dtype) + 0.2, torch.rand(n, dtype=dtype) + 0.2)
    elif metric.startswith("dense"):
        kw["metric"] = (spd(m, dtype), spd(n, dtype))
    elif metric == "out-only":  # one side diagonal, the other the identity
        kw["metric"] = (torch.rand(m, dtype=dtype) + 0.2, None)
    elif metric.startswith("in-only"):
        kw["metric"] = (None, spd(n, dtype))
    if metric.endswith("-pre"):
        kw["precondition"] = [False, True, True]
    return terms, coeffs, (b0, a0), kw


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("iters", [0, 1, 2, 3])
@pytest.mark.parametrize("prox", PROX)
@pytest.mark.parametrize("start", ["A", "B"])
@pytest.mark.parametrize("metric", METRICS)
def test_matches_explicit_float64(shape, iters, prox, start, metric):
    terms, coeffs, init, kw = make_problem(*shape, metric=metric)
    b, a = oplora.lorsum(terms, coeffs, init, iters=iters, prox=prox, start=start, **kw)
    be, ae = explicit_lorsum(terms, coeffs, init, iters=iters, prox=prox, start=start, **kw)
    assert b.dtype == a.dtype == F64
    assert b.shape == be.shape and a.shape == ae.shape
    assert rel_err(b @ a, be @ ae) < TOL[F64]
    if prox > 0 or min(shape[:2]) >= shape[2]:  # the factors themselves are unique here
        assert rel_err(b, be) < TOL[F64] and rel_err(a, ae) < TOL[F64]


@pytest.mark.parametrize("iters", [0, 1, 2])
@pytest.mark.parametrize("metric", ["none", "diag-pre", "dense-pre"])
def test_float32_matches_explicit(iters, metric):
    terms, coeffs, init, kw = make_problem(53, 41, 6, 13, dtype=torch.float32, metric=metric)
    b, a = oplora.lorsum(terms, coeffs, init, iters=iters, prox=1e-2, **kw)
    be, ae = explicit_lorsum(terms, coeffs, init, iters=iters, prox=1e-2, **kw)
    assert b.dtype == a.dtype == torch.float32
    assert rel_err(b @ a, be @ ae) < TOL[torch.float32]


def test_converges_to_truncated_svd():
    m, n, r = 60, 45, 4
    spectrum = torch.cat([torch.tensor([5.0, 4.0, 3.0, 2.0]), 0.5 * torch.rand(16)]).double()
    u, _ = torch.linalg.qr(torch.randn(m, 20, dtype=F64))
    v, _ = torch.linalg.qr(torch.randn(n, 20, dtype=F64))
    terms = [(u * spectrum, v.T)]
    optimum = truncated_svd(terms[0][0] @ terms[0][1], r)
    init = (torch.randn(m, r, dtype=F64), torch.randn(r, n, dtype=F64))
    errors = [rel_err(torch.matmul(*oplora.lorsum(terms, [1.0], init, iters=it)), optimum)
              for it in (1, 3, 10, 60)]
    assert all(later < earlier for earlier, later in zip(errors, errors[1:]))
    assert errors[-1] < 1e-10


def test_warm_start_one_round_is_near_svd_of_a_small_step():
    """The OPLoRA regime: T = B0 A0 - lr G with a small step; one warm-started round is close."""
    m, n, r = 80, 70, 6
    b0 = with_condition(m, r, 10.0)
    a0 = with_condition(r, n, 10.0)
    d, x = torch.randn(m, 32, dtype=F64), torch.randn(32, n, dtype=F64)
    lr = 0.01 * (b0 @ a0).norm().item() / (d @ x).norm().item()  # a step of 1% of the adapter
    terms, coeffs = [(b0, a0), (d, x)], [1.0, -lr]
    optimum = truncated_svd(explicit_target(terms, coeffs)[0], r)
    b, a = oplora.lorsum(terms, coeffs, (b0, a0), iters=1)
    assert rel_err(b @ a, optimum) < 1e-4


@pytest.mark.parametrize("prox", [0.0, 0.05])
def test_jacobi_step_is_the_riemannian_step(prox):
    m, n, r, k, lr = 30, 20, 4, 9, 0.1
    b0, a0 = torch.randn(m, r, dtype=F64), torch.randn(r, n, dtype=F64)
    d, x = torch.randn(m, k, dtype=F64), torch.randn(k, n, dtype=F64)
    g = d @ x
    grad_a, grad_b = b0.T @ g, g @ a0.T
    eye = torch.eye(r, dtype=F64)
    a_ref = a0 - lr * torch.linalg.solve(b0.T @ b0 + prox * eye, grad_a)
    b_ref = b0 - lr * torch.linalg.solve(a0 @ a0.T + prox * eye, grad_b.T).T
    b, a = oplora.lorsum([(b0, a0), (d, x)], [1.0, -lr], (b0, a0), iters=0, prox=prox)
    assert rel_err(a, a_ref) < 1e-12 and rel_err(b, b_ref) < 1e-12


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("iters", [0, 1, 2])
@pytest.mark.parametrize("prox", [0.0, 1e-6])
def test_ill_conditioned_float32(seed, iters, prox):
    """SPEC: float32 factors of condition number 1e4; the product within 5e-4 of float64."""
    torch.manual_seed(seed)
    m, n, r = 300, 220, 16
    b0 = with_condition(m, r, 1e4, torch.float32)
    a0 = with_condition(r, n, 1e4, torch.float32)
    d, x = torch.randn(m, 48), torch.randn(48, n)
    terms, coeffs = [(b0, a0), (d, x)], [1.0, -1e-3]
    b, a = oplora.lorsum(terms, coeffs, (b0, a0), iters=iters, prox=prox)
    terms64 = [(u.double(), v.double()) for u, v in terms]
    b64, a64 = oplora.lorsum(terms64, coeffs, (b0.double(), a0.double()), iters=iters, prox=prox)
    assert rel_err(b.double() @ a.double(), b64 @ a64) < TOL["cond1e4"]


@pytest.mark.parametrize("iters", [0, 1])
@pytest.mark.parametrize("metric_range", [1e2, 1e4])
def test_ill_conditioned_float32_with_a_kfac_like_metric(iters, metric_range):
    """cond(B0) = 1e4 and a diagonal metric that is large where B0 is large: cond(W B0) reaches
    1e6-1e8, which is real information, not rounding noise; the product stays within SPEC's 5e-4
    of float64 (no singular direction may be dropped)."""
    m, n, r = 512, 384, 8
    block = m // r
    spectrum = torch.logspace(0, -4, r)
    b0 = torch.zeros(m, r)
    d_out = torch.ones(m)
    for j in range(r):  # column j lives on its own block of rows
        b0[j * block:(j + 1) * block, j] = torch.randn(block) / block ** 0.5 * spectrum[j]
        d_out[j * block:(j + 1) * block] = metric_range ** (1 - 2 * j / (r - 1))
    a0 = torch.linalg.qr(torch.randn(n, r))[0].T.contiguous()
    d, x = torch.randn(m, 32), torch.randn(32, n)
    lr = 0.05 * (b0 @ a0).norm().item() / (d @ x).norm().item()
    terms, coeffs = [(b0, a0), (d, x)], [1.0, -lr]
    b, a = oplora.lorsum(terms, coeffs, (b0, a0), iters=iters, metric=(d_out, None))
    up = [(u.double(), v.double()) for u, v in terms]
    b64, a64 = oplora.lorsum(up, coeffs, (b0.double(), a0.double()), iters=iters, metric=(d_out.double(), None))
    assert rel_err(b.double() @ a.double(), b64 @ a64) < TOL["cond1e4"]


def test_non_contiguous_inputs_give_the_same_answer():
    terms, coeffs, init, kw = make_problem(31, 22, 4, 9, metric="diag-pre")
    views = [(u.T.contiguous().T, v[:, ::1].T.contiguous().T) for u, v in terms]  # column-major copies
    views[1] = (torch.randn(9, 31, dtype=F64).T, terms[1][1])  # a transposed view, as s D^T is passed
    ref_terms = [(u.contiguous(), v.contiguous()) for u, v in views]
    got = oplora.lorsum(views, coeffs, init, iters=2, prox=0.1, **kw)
    want = oplora.lorsum(ref_terms, coeffs, init, iters=2, prox=0.1, **kw)
    assert rel_err(got[0], want[0]) < 1e-13 and rel_err(got[1], want[1]) < 1e-13


def test_a_tiny_coefficient_on_huge_entries_does_not_overflow():
    """T = 1e-40 * (1e20 U)(1e20 V) is of order 1 although U V overflows float32."""
    m, n, r = 20, 16, 3
    u, v = torch.randn(m, 4), torch.randn(4, n)
    init = (torch.randn(m, r), torch.randn(r, n))
    got = oplora.lorsum([(u * 1e20, v * 1e20)], [1e-40], init, iters=2)
    want = oplora.lorsum([(u, v)], [1.0], init, iters=2)
    assert rel_err(got[0] @ got[1], want[0] @ want[1]) < 1e-5


def test_a_result_that_overflows_its_dtype_raises():
    """float16 factors whose exact answer is beyond 65504: an error, never inf in the factors."""
    m, n, r = 24, 18, 2
    b0 = (1e-3 * torch.randn(m, r)).half()
    a0 = torch.randn(r, n).half()
    big = (1e3 * torch.randn(m, 2)).half(), torch.randn(2, n).half()
    with pytest.raises(FloatingPointError, match="not representable in torch.float16"):
        oplora.lorsum([big], [1.0], (b0, a0), iters=1)


@pytest.mark.parametrize("iters", [0, 1, 2])
def test_lora_init_b_zero(iters):
    """B0 = 0 (LoRA init) with prox = 0: no NaN, A keeps A0 in the first A-step, B moves."""
    m, n, r, k = 40, 30, 4, 8
    b0, a0 = torch.zeros(m, r), torch.randn(r, n)
    d, x = torch.randn(m, k), torch.randn(k, n)
    terms, coeffs = [(b0, a0), (d, x)], [1.0, -0.1]
    b, a = oplora.lorsum(terms, coeffs, (b0, a0), iters=iters)
    assert torch.isfinite(b).all() and torch.isfinite(a).all()
    assert b.abs().max() > 0
    be, ae = explicit_lorsum(terms, coeffs, (b0, a0), iters=iters)
    assert rel_err(b @ a, be @ ae) < TOL[torch.float32]
    if iters <= 1:  # the first A-step sees B = 0: A keeps A0 exactly
        assert torch.equal(a, a0)


def test_all_zero_start_stays_put():
    b0, a0 = torch.zeros(10, 3), torch.zeros(3, 8)
    b, a = oplora.lorsum([(b0, a0)], [1.0], (b0, a0), iters=2)
    assert torch.equal(b, b0) and torch.equal(a, a0)


@pytest.mark.parametrize("iters", [0, 1, 2])
def test_rank_deficient_float32_is_the_nearest_least_squares_solution(iters):
    m, n, r = 50, 40, 5
    b0 = torch.randn(m, r)
    b0[:, 3] = b0[:, 1]  # exactly rank-deficient: the lam -> 0+ limit keeps A0's null-space part
    b0[:, 4] = 0.0
    a0 = torch.randn(r, n)
    a0[2] = a0[0]
    d, x = torch.randn(m, 7), torch.randn(7, n)
    terms, coeffs = [(b0, a0), (d, x)], [1.0, -0.2]
    b, a = oplora.lorsum(terms, coeffs, (b0, a0), iters=iters)
    be, ae = explicit_lorsum(terms, coeffs, (b0, a0), iters=iters)
    assert rel_err(b, be) < 1e-4 and rel_err(a, ae) < 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_computes_in_float32(dtype):
    terms, coeffs, init, kw = make_problem(33, 27, 4, 6, dtype=dtype, metric="diag-pre")
    b, a = oplora.lorsum(terms, coeffs, init, iters=1, prox=1e-2, **kw)
    assert b.dtype == a.dtype == dtype
    up = lambda t: t.float()  # noqa: E731
    b32, a32 = oplora.lorsum([(up(u), up(v)) for u, v in terms], coeffs, (up(init[0]), up(init[1])), iters=1,
                             prox=1e-2, metric=tuple(up(t) for t in kw["metric"]), precondition=kw["precondition"])
    assert torch.equal(b, b32.to(dtype)) and torch.equal(a, a32.to(dtype))


def test_float64_term_promotes_and_result_keeps_init_dtype():
    terms, coeffs, init, _ = make_problem(20, 15, 3, 4, dtype=torch.float32)
    terms64 = [(u.double(), v.double()) for u, v in terms]
    b, a = oplora.lorsum(terms64, coeffs, init, iters=2)
    be, ae = explicit_lorsum(terms64, coeffs, init, iters=2)
    assert b.dtype == torch.float32
    assert rel_err(b @ a, be @ ae) < 1e-6


def test_one_sided_metric_is_identity_on_the_other_side():
    terms, coeffs, init, _ = make_problem(25, 19, 3, 5)
    d_out = torch.rand(25, dtype=F64) + 0.5
    got = oplora.lorsum(terms, coeffs, init, iters=2, prox=0.1, metric=(d_out, None))
    ref = oplora.lorsum(terms, coeffs, init, iters=2, prox=0.1, metric=(d_out, torch.ones(19, dtype=F64)))
    assert rel_err(got[0], ref[0]) < 1e-12 and rel_err(got[1], ref[1]) < 1e-12


def test_inputs_are_not_modified():
    terms, coeffs, init, kw = make_problem(21, 17, 3, 5, metric="dense-pre")
    before = [t.clone() for t in (*init, *(x for pair in terms for x in pair), *kw["metric"])]
    b, a = oplora.lorsum(terms, coeffs, init, iters=3, prox=0.5, **kw)
    after = [*init, *(x for pair in terms for x in pair), *kw["metric"]]
    assert all(torch.equal(x, y) for x, y in zip(before, after))
    assert b.data_ptr() != init[0].data_ptr() and a.data_ptr() != init[1].data_ptr()


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("metric", ["none", "diag-pre"])
def test_never_forms_an_m_by_n_matrix(metric):
    m, n, r, k = 300, 200, 4, 8
    terms, coeffs, init, kw = make_problem(m, n, r, k, dtype=torch.float32, metric=metric)
    with _LargestTensor() as probe:
        oplora.lorsum(terms, coeffs, init, iters=2, prox=1e-3, **kw)
    assert 0 < probe.largest <= max(m, n) * max(r, k)


@given(
    m=st.integers(1, 24), n=st.integers(1, 24), r=st.integers(1, 6),
    ks=st.lists(st.integers(0, 7), min_size=1, max_size=3),
    iters=st.integers(0, 3), prox=st.sampled_from([0.0, 1e-4, 0.3, 30.0]),
    start=st.sampled_from(["A", "B"]), metric=st.sampled_from(["none", "diag", "diag-pre"]),
    seed=st.integers(0, 2**31 - 1),
)
@settings(max_examples=150, deadline=None)
def test_property_random_shapes(m, n, r, ks, iters, prox, start, metric, seed):
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=F64)  # noqa: E731
    init = (rnd(m, r), rnd(r, n))
    terms = [init] + [(rnd(m, k), rnd(k, n)) for k in ks]
    coeffs = [1.0] + [float(c) for c in rnd(len(ks))]
    kw = {}
    if metric != "none":
        kw["metric"] = (torch.rand(m, generator=gen, dtype=F64) + 0.1, torch.rand(n, generator=gen, dtype=F64) + 0.1)
    if metric == "diag-pre":
        kw["precondition"] = [False] + [True] * len(ks)
    b, a = oplora.lorsum(terms, coeffs, init, iters=iters, prox=prox, start=start, **kw)
    be, ae = explicit_lorsum(terms, coeffs, init, iters=iters, prox=prox, start=start, **kw)
    assert torch.isfinite(b).all() and torch.isfinite(a).all()
    assert (b @ a - be @ ae).norm() <= 1e-7 * max(1.0, (be @ ae).norm().item())
