"""The C++ CPU backend (``oplora._cpu`` via ``oplora._cpu_ops``) against ``oplora.reference``.

The fused row pass over odd shapes, both dtypes, several chunks, each output on and off; the
half-steps of the step engine against ``reference.lorsum`` (prox 0 and > 0, metric on and off,
B = 0); whole optimizer runs on the C++ ops against the torch ops; bad buffers rejected with the
message the user sees. ``make test`` sets ``OPLORA_REQUIRE_EXT=1``, so the extension is present.
"""

import itertools

import numpy as np
import pytest
import torch

import oplora
from oplora import _backend, reference
from oplora.optim import engine

cpu_ops = pytest.importorskip("oplora._cpu_ops", reason="the C++ extension oplora._cpu is not built")
from oplora import _cpu  # noqa: E402

# (rtol of the row pass, rtol of a whole step's product B A) per dtype.
TOL = {torch.float32: (2e-6, 2e-5), torch.float64: (1e-13, 1e-11)}


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def chunks(n, m, rows, dtype):
    return [torch.randn(t, n, dtype=dtype) for t in rows], [torch.randn(t, m, dtype=dtype) for t in rows]


# ------------------------------------------------------------------------------------------ row_pass

ROW_SHAPES = [  # n, m, Kd, Kx, chunk rows
    (1, 1, 1, 1, [1]),
    (7, 5, 3, 2, [3]),
    (37, 23, 9, 17, [11, 4]),
    (64, 48, 16, 32, [130]),
    (129, 67, 24, 8, [1, 63, 200]),
    (300, 12, 40, 5, [257, 7]),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,m,kd,kx,rows", ROW_SHAPES)
def test_row_pass_matches_reference(dtype, n, m, kd, kx, rows):
    xs, gs = chunks(n, m, rows, dtype)
    qd, qx = torch.randn(m, kd, dtype=dtype), torch.randn(n, kx, dtype=dtype)
    (got,) = cpu_ops.row_pass([(xs, gs, qd, qx, True)])
    want = reference.row_pass(xs, gs, qd, qx, True)
    for g, w in zip(got, want):
        assert g.dtype == dtype and g.shape == w.shape
        assert rel(g, w) < TOL[dtype][0]


@pytest.mark.parametrize("with_qd,with_qx,stats", [c for c in itertools.product([False, True], repeat=3) if any(c)])
def test_row_pass_computes_only_what_is_asked(with_qd, with_qx, stats):
    xs, gs = chunks(45, 31, [20, 9], torch.float32)
    qd = torch.randn(31, 6) if with_qd else None
    qx = torch.randn(45, 10) if with_qx else None
    (got,) = cpu_ops.row_pass([(xs, gs, qd, qx, stats)])
    want = reference.row_pass(xs, gs, qd, qx, stats)
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if w is not None:
            assert rel(g, w) < TOL[torch.float32][0]


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
def test_row_pass_is_the_same_on_any_thread_count(threads, monkeypatch):
    xs, gs = chunks(70, 50, [100, 33], torch.float64)
    qd, qx = torch.randn(50, 12, dtype=torch.float64), torch.randn(70, 4, dtype=torch.float64)
    want = reference.row_pass(xs, gs, qd, qx, True)
    out = [np.empty((70, 12)), np.empty((50, 4)), np.empty(70), np.empty(50)]
    _cpu.row_pass([x.numpy() for x in xs], [g.numpy() for g in gs], qd.numpy(), qx.numpy(), *out, threads=threads)
    for g, w in zip(out, want):
        assert rel(torch.from_numpy(g), w) < TOL[torch.float64][0]


def test_grouped_row_pass_of_layers_of_different_shapes():
    jobs = []
    for n, m, kd, kx, rows in ROW_SHAPES[1:4]:
        xs, gs = chunks(n, m, rows, torch.float32)
        jobs.append((xs, gs, torch.randn(m, kd), torch.randn(n, kx), True))
    for got, job in zip(cpu_ops.row_pass(jobs), jobs):
        for g, w in zip(got, reference.row_pass(*job)):
            assert rel(g, w) < TOL[torch.float32][0]


def test_row_pass_propagates_nan():
    xs, gs = chunks(9, 8, [5], torch.float32)
    xs[0][2, 3] = float("nan")
    (px, pd, sx, sg) = cpu_ops.row_pass([(xs, gs, torch.randn(8, 2), torch.randn(9, 2), True)])[0]
    assert torch.isnan(px).any() and torch.isnan(pd).any() and torch.isnan(sx[3]) and torch.isfinite(sg).all()


# ------------------------------------------------------------------ half-steps vs reference.lorsum

def _engine_lorsum(ops, u_rows, x_rows, thin, data_coeff, init, *, iters, prox, metric, start):
    """The engine on one problem whose data term is ``sum_j G_j^T X_j``."""
    problem = engine.Problem(init=init, thin=thin, data_coeff=data_coeff, data_precondition=metric is not None,
                             metric=metric, lam=prox, iters=iters, start=start)
    layer = engine.Layer(xs=x_rows, gs=u_rows, problems=[problem])
    return engine.solve([layer], ops)[0][0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("iters,prox,metric,start,zero_b", [
    (1, 0.0, False, "A", False), (1, 0.1, False, "A", False), (2, 0.0, True, "A", False), (1, 0.05, True, "B", False),
    (0, 0.1, True, "A", False), (0, 0.0, False, "A", False), (1, 0.0, False, "A", True), (2, 0.1, True, "B", True),
])
def test_engine_half_steps_on_cpp_match_reference_lorsum(dtype, iters, prox, metric, start, zero_b):
    m, n, r, rows = 41, 29, 5, [13, 8]
    b0 = torch.zeros(m, r, dtype=dtype) if zero_b else torch.randn(m, r, dtype=dtype)
    a0 = torch.randn(r, n, dtype=dtype)
    xs, gs = chunks(n, m, rows, dtype)
    um, vm = torch.randn(m, 3, dtype=dtype), torch.randn(3, n, dtype=dtype)
    met = (torch.rand(m, dtype=dtype) + 0.5, torch.rand(n, dtype=dtype) + 0.5) if metric else None
    lr = 0.3
    thin = [(b0, a0, 1.0, False), (um, vm, -lr * 0.9, metric)]
    terms = [(b0, a0)] + [(g.mT, x) for x, g in zip(xs, gs)] + [(um, vm)]
    coeffs = [1.0] + [-lr] * len(rows) + [-lr * 0.9]
    pre = [False] + [True] * (len(rows) + 1) if metric else None
    want = reference.lorsum(terms, coeffs, (b0, a0), iters=iters, prox=prox, metric=met, precondition=pre, start=start)
    want = want[0].double() @ want[1].double()
    for ops in (cpu_ops.OPS, _backend.TORCH_OPS):
        b, a = _engine_lorsum(ops, gs, xs, thin, -lr, (b0, a0), iters=iters, prox=prox, metric=met, start=start)
        assert b.dtype == dtype and a.dtype == dtype
        assert rel(b.double() @ a.double(), want) < TOL[dtype][1], ops.name


# ----------------------------------------------------------------------- whole optimizer runs

def _run(backend, make_opt, steps, monkeypatch, dtype=torch.float32):
    monkeypatch.setenv("OPLORA_BACKEND", backend)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.GELU(), torch.nn.Linear(40, 6)).to(dtype)
    oplora.add_lora(model, ["0", "2"], r=4, alpha=8)
    opt = make_opt(model)
    data = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for _ in range(2):  # two micro-batches per step: two chunks per layer
            x = torch.randn(16, 24, generator=data, dtype=dtype)
            y = torch.randint(0, 6, (16,), generator=data)
            torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    assert _backend.ops_for(torch.device("cpu")).name == backend
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name,make_opt", [
    ("oplora", lambda m: oplora.OPLoRA(m, lr=0.05, seed=3)),
    ("oplora-jacobi", lambda m: oplora.OPLoRA(m, lr=0.05, iters=0, momentum=0.5, seed=3)),
    ("scaled-kfac", lambda m: oplora.ScaledOPLoRA(m, lr=0.01, seed=3)),
    ("scaled-sqrt-iters2", lambda m: oplora.ScaledOPLoRA(m, lr=0.01, metric_power=0.5, iters=2, seed=3)),
    ("scaled-shampoo", lambda m: oplora.ScaledOPLoRA(m, lr=0.01, statistics="shampoo", metric_power=0.25, seed=3)),
])
def test_optimizer_runs_on_cpp_match_torch_ops(name, make_opt, monkeypatch):
    got = _run("cpp", make_opt, 12, monkeypatch)
    want = _run("torch", make_opt, 12, monkeypatch)
    for g, w in zip(got, want):
        assert rel(g, w) < 2e-4, name


def test_bf16_factors_step_on_cpp_like_torch_ops(monkeypatch):
    make = lambda m: oplora.ScaledOPLoRA(m, lr=0.01, seed=3)  # noqa: E731
    got = _run("cpp", make, 5, monkeypatch, dtype=torch.bfloat16)
    want = _run("torch", make, 5, monkeypatch, dtype=torch.bfloat16)
    for g, w in zip(got, want):
        assert g.dtype == torch.bfloat16
        assert rel(g.float(), w.float()) < 2e-2  # a few bf16 roundings apart at most


# ------------------------------------------------------------------------------------ bad buffers

def _good():
    x, g = np.ones((4, 3), np.float32), np.ones((4, 2), np.float32)
    return dict(xs=[x], gs=[g], qd=np.ones((2, 5), np.float32), qx=None, px=np.empty((3, 5), np.float32), pd=None,
                sx=None, sg=None)


@pytest.mark.parametrize("change,message", [
    (dict(xs=[np.ones((4, 3), np.float16)]), r"xs\[0\] must be float32 or float64"),
    (dict(gs=[np.ones((4, 2), np.float64)]), r"gs\[0\] must be float32 \(like the other operands\)"),
    (dict(xs=[np.ones((6, 3), np.float32)[::2]]), r"xs\[0\] must be C-contiguous"),
    (dict(gs=[np.ones((5, 2), np.float32)]), r"gs\[0\] has shape \(5, 2\) but dimension 0 must be 4"),
    (dict(qd=np.ones((3, 5), np.float32)), r"qd has shape \(3, 5\) but dimension 0 must be 2"),
    (dict(px=np.empty((3, 4), np.float32)), r"px has shape \(3, 4\) but dimension 1 must be 5"),
    (dict(px=None), r"qd is given, so px \(n x Kd\) must be too"),
    (dict(xs=[np.ones(4, np.float32)]), r"xs\[0\] must be 2-D, got shape \(4,\)"),
    (dict(gs=[]), r"xs and gs must be non-empty lists of the same length"),
    (dict(sx=np.empty(3, np.float32)), r"give both sx \(n\) and sg \(m\), or neither"),
])
def test_bad_row_pass_buffers_are_rejected(change, message):
    args = {**_good(), **change}
    with pytest.raises(ValueError, match=message):
        _cpu.row_pass(**args)


def test_read_only_output_is_rejected():
    args = _good()
    args["px"].setflags(write=False)
    with pytest.raises(ValueError, match="px"):
        _cpu.row_pass(**args)


def test_second_chunk_must_match_the_first():
    args = _good()
    args["xs"].append(np.ones((2, 4), np.float32))
    args["gs"].append(np.ones((2, 2), np.float32))
    with pytest.raises(ValueError, match=r"xs\[1\] has shape \(2, 4\) but dimension 1 must be 3"):
        _cpu.row_pass(**args)
